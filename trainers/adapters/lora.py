"""LoRA: y = base(x) + up(down(x)) · alpha / rank (Hu et al.), saved with kohya's keys.

The file layout is what ComfyUI's `comfy/lora.py` maps for every `diffusion_model.<path>.weight`:
`lora_unet_<path with . as _>.lora_down.weight`, `.lora_up.weight` and `.alpha`. Initialisation follows
PEFT's LoraLayer (down: Kaiming-uniform with a=√5, up: zeros), so a new adapter changes nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AdapterSpec
from .base import AdapterLayer

FILE_PREFIX = "lora_unet_"


class LoraLayer(AdapterLayer):
    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.down = torch.nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.scale = scale

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.down.shape[1])   # kaiming_uniform_(a=√5) on a (rank, in) matrix
            self.down.copy_(torch.empty_like(self.down, dtype=torch.float32)
                            .uniform_(-bound, bound, generator=generator).to(self.down.dtype))
            self.up.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale


def parameter_names(path: str) -> dict[str, str]:
    """LoraLayer attribute -> key in the adapter's weight dict."""
    return {"down": f"{path}.lora_down.weight", "up": f"{path}.lora_up.weight"}


def build_layers(spec: AdapterSpec, weights: dict[str, torch.Tensor] | None, dtype: torch.dtype,
                 device=None) -> dict[str, LoraLayer]:
    """One LoraLayer per target; initialised from spec.seed when `weights` is None."""
    generator = torch.Generator().manual_seed(spec.seed)
    layers = {}
    for path, in_features, out_features in spec.targets:
        layer = LoraLayer(in_features, out_features, spec.rank, spec.scale, dtype)
        if weights is None:
            layer.reset(generator)
        else:
            names = parameter_names(path)
            with torch.no_grad():
                layer.down.copy_(weights[names["down"]])
                layer.up.copy_(weights[names["up"]])
        layers[path] = layer.to(device) if device is not None else layer
    return layers


def layer_weights(layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in layers.items():
        names = parameter_names(path)
        out[names["down"]] = layer.down.detach().to("cpu", copy=True)
        out[names["up"]] = layer.up.detach().to("cpu", copy=True)
    return out


def file_key(path: str) -> str:
    return FILE_PREFIX + path.replace(".", "_")


def to_file_tensors(spec: AdapterSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    out = {}
    for path, _, _ in spec.targets:
        names, key = parameter_names(path), file_key(path)
        out[f"{key}.lora_down.weight"] = weights[names["down"]].to(dtype)
        out[f"{key}.lora_up.weight"] = weights[names["up"]].to(dtype)
        out[f"{key}.alpha"] = torch.tensor(float(spec.alpha))
    return out


def from_file_tensors(spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for `spec.targets` from a file written by `to_file_tensors` (kohya keys)."""
    weights = {}
    for path, in_features, out_features in spec.targets:
        names, key = parameter_names(path), file_key(path)
        try:
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        except KeyError as e:
            raise ValueError(f"the adapter file has no LoRA weights for layer {path!r}") from e
        if tuple(down.shape) != (spec.rank, in_features) or tuple(up.shape) != (out_features, spec.rank):
            raise ValueError(f"LoRA weights of layer {path!r} have shapes {tuple(down.shape)}, {tuple(up.shape)}; "
                             f"expected ({spec.rank}, {in_features}), ({out_features}, {spec.rank})")
        weights[names["down"]] = down.float()
        weights[names["up"]] = up.float()
    return weights
