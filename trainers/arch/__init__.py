"""Architectures by name, and detection from a ComfyUI MODEL."""
from .base import Architecture, Batch, latents_in
from .chroma import Chroma
from .flux import Flux
from .flux2 import Flux2
from .qwen_image import QwenImage
from .sd3 import SD3
from .sdxl import SDXL
from .z_image import ZImage

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SDXL(), SD3(), Flux(), Chroma(), QwenImage(), Flux2(),
                                                                 ZImage())}


def detect(patcher) -> Architecture:
    base_model = patcher.model
    for arch in ARCHITECTURES.values():
        if arch.matches(base_model):
            return arch
    raise ValueError(f"the MODEL is a {type(base_model).__name__}; EriDiffusion trains "
                     f"{', '.join(ARCHITECTURES)} models. Load one of those with the checkpoint loader.")
