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
    CAST_ONCE = ("down", "up")

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

    # The scale multiplies the rank-r hidden activation, not the layer-sized output: the same product, a far
    # smaller tensor (and no kernel at all when alpha == rank).
    def _hidden(self, x: torch.Tensor, layer) -> torch.Tensor:
        hidden = base.functional(layer, x, self.cast("down", x.dtype))
        return hidden * self.scale if self.scale != 1.0 else hidden

    def delta(self, x: torch.Tensor, layer) -> torch.Tensor:
        if self.down.ndim == 4:
            return F.conv2d(self._hidden(x, layer), self.cast("up", x.dtype))
        return F.linear(self._hidden(x, layer), self.cast("up", x.dtype))

    def apply(self, layer, x, base_forward):
        if self.magnitude is not None or self.down.ndim == 4:
            return super().apply(layer, x, base_forward)
        # hidden·upᵀ added by the GEMM itself into the base output it just made (nothing saved that output for
        # backward), not a GEMM and then an add: at SDXL's sizes the adapters' kernel count is what costs. The
        # rows are flattened before the base layer, so the in-place add is on its output itself, not on a view
        # (autograd would copy the whole gradient for an in-place change of a view).
        rows = x.reshape(-1, x.shape[-1])
        out = base_forward(rows)
        hidden = self._hidden(rows, layer).to(out.dtype)
        out.addmm_(hidden, self.cast("up", out.dtype).t())
        return out.view(*x.shape[:-1], out.shape[-1])
