"""LoRA (Hu et al.): ΔW = up · down · alpha / rank, saved with kohya's keys; LoCon for convolutions.

The file layout is what ComfyUI's `comfy/lora.py` maps for every `diffusion_model.<path>.weight`:
`lora_unet_<path with . as _>.lora_down.weight`, `.lora_up.weight` and `.alpha` (plus `.dora_scale` with
DoRA). A convolution's down is a conv with the layer's kernel, stride and padding and its up a 1×1 conv
(kohya's LoCon: down (rank, in, kh, kw), up (out, rank, 1, 1)). Initialisation follows PEFT's LoraLayer
(down: Kaiming-uniform with a=√5, up: zeros), so a new adapter changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AdapterSpec
from . import base
from .base import AdapterLayer, check_shapes, target_shape


class LoraLayer(AdapterLayer):
    SUFFIXES = {"down": "lora_down.weight", "up": "lora_up.weight"}

    def __init__(self, shape, rank: int, alpha: float, dtype: torch.dtype = torch.float32):
        out_features, in_features, *kernel = shape
        super().__init__(shape, {"lora_down.weight": (rank, in_features, *kernel),
                                 "lora_up.weight": (out_features, rank, *[1] * len(kernel))}, dtype)
        self.scale = alpha / rank

    @classmethod
    def create(cls, spec: AdapterSpec, target, shapes, dtype) -> "LoraLayer":
        shape = target_shape(target)
        rank = shapes["lora_down.weight"][0] if shapes and "lora_down.weight" in shapes else spec.rank_for(target)
        layer = cls(shape, rank, spec.alpha_for(target), dtype)
        if shapes is not None:
            check_shapes(target[0], "LoRA", shapes, {s: tuple(p.shape) for s, p in layer.tensors().items()})
        return layer

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            base.kaiming_uniform_(self.down, generator)
            self.up.zero_()

    def diff_weight(self) -> torch.Tensor:
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.shape) * self.scale

    def delta(self, x: torch.Tensor, layer) -> torch.Tensor:
        if self.down.ndim == 4:
            hidden = base.functional(layer, x, self.down.to(x.dtype))
            return F.conv2d(hidden, self.up.to(x.dtype)) * self.scale
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale
