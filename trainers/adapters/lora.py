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

from ..blocks import kept_in_checkpoints, kept_linear_outputs
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
        down = self.cast("down", x.dtype)
        with kept_in_checkpoints():
            hidden = base.functional(layer, x, down)
        return hidden * self.scale if self.scale != 1.0 else hidden

    def delta(self, x: torch.Tensor, layer) -> torch.Tensor:
        if self.down.ndim == 4:
            return F.conv2d(self._hidden(x, layer), self.cast("up", x.dtype))
        return F.linear(self._hidden(x, layer), self.cast("up", x.dtype))

    def apply(self, layer, x, base_forward):
        if self.magnitude is not None or self.down.ndim == 4:
            return super().apply(layer, x, base_forward)
        # The rows are flattened before the base layer, so the adapter's in-place add is on its output itself,
        # not on a view (autograd would copy the whole gradient for an in-place change of a view).
        rows = x.reshape(-1, x.shape[-1])
        fp8 = getattr(base_forward, "gemm", None)     # fp8_compute: base_forward is an fp8.Fp8Forward
        weight = base_forward.weight(rows) if fp8 is not None and FUSED_LINEAR else None
        if weight is not None and not torch.is_autocast_enabled(x.device.type):
            bias = None if layer.bias is None else layer.bias.to(x.dtype)
            out = LoraLinear.apply(rows, weight, bias, self.cast("down", x.dtype), self.cast("up", x.dtype),
                                   self.scale, fp8)
        elif FUSED_LINEAR and _plain_linear(layer, rows):
            out = LoraLinear.apply(rows, layer.weight, layer.bias, self.cast("down", x.dtype),
                                   self.cast("up", x.dtype), self.scale)
        else:    # a forward of ComfyUI's that casts or patches its weight (fp8, lowvram, stacked LoRAs)
            out = base_forward(rows)
            hidden = self._hidden(rows, layer).to(out.dtype)
            out.addmm_(hidden, self.cast("up", out.dtype).t())
        return out.view(*x.shape[:-1], out.shape[-1])


# LoraLinear wherever the layer allows it (False: autograd's own backward everywhere, for comparisons).
FUSED_LINEAR = True


def _plain_linear(layer, x: torch.Tensor) -> bool:
    """True when the layer's own forward is exactly F.linear(x, layer.weight, layer.bias): a torch Linear whose
    ComfyUI forward casts nothing (weights already in x's dtype and device, no weight or bias functions) and no
    autocast (which would change the GEMMs' dtype)."""
    return (isinstance(layer, torch.nn.Linear) and not getattr(layer, "comfy_cast_weights", False)
            and not getattr(layer, "weight_function", None) and not getattr(layer, "bias_function", None)
            and layer.weight.dtype == x.dtype and layer.weight.device == x.device
            and (layer.bias is None or layer.bias.dtype == x.dtype)
            and not torch.is_autocast_enabled(x.device.type))


class LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + scale · (x downᵀ) upᵀ for rows x, W frozen, with a backward written out: autograd would
    compute the base's and the adapter's input gradients separately and add them (one more kernel and one more
    activation-sized tensor per adapted layer, ~700 per SDXL step); here the adapter's part is added by the GEMM
    itself into the base's. The forward adds hidden · upᵀ into the base output in the GEMM as well. With `fp8`
    (an fp8.Fp8Gemm: fp8_compute) the base's two GEMMs run in FP8, the adapter's in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, fp8=None):
        out, hidden = kept_linear_outputs(lambda: LoraLinear.outputs(x, weight, bias, down, up, scale, fp8))
        ctx.scale, ctx.fp8 = scale, fp8
        ctx.save_for_backward(x, weight, down, up, hidden)
        return out

    @staticmethod
    def outputs(x, weight, bias, down, up, scale, fp8):
        """(y, scale · x downᵀ): the output and the rank-r hidden activation backward needs."""
        out = F.linear(x, weight, bias) if fp8 is None else fp8.forward(x, weight, bias, x.dtype)
        with kept_in_checkpoints():
            hidden = F.linear(x, down)
        if scale != 1.0:
            hidden = hidden * scale
        out.addmm_(hidden, up.t())
        return out, hidden

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, down, up, hidden = ctx.saved_tensors
        grad_hidden = grad_out.mm(up)
        if ctx.scale != 1.0:
            grad_hidden = grad_hidden * ctx.scale
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.mm(weight) if ctx.fp8 is None else ctx.fp8.input_grad(grad_out, weight, x.dtype)
            grad_x.addmm_(grad_hidden, down)
        grad_down = grad_hidden.t().mm(x) if ctx.needs_input_grad[3] else None
        grad_up = grad_out.t().mm(hidden) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_down, grad_up, None, None
