"""What every adapter method provides, and how an adapter is put into a ComfyUI MODEL.

Adapters are activation-side: a patched layer computes `base(x) + delta(x)`, where `base` is the layer's
own forward (so ComfyUI's per-layer casting of fp8 / lowvram weights still applies) and `delta` is the
adapter's. They are installed as ModelPatcher object patches on `diffusion_model.<path>.forward`, which
ComfyUI applies only while that clone is loaded and restores on unload: the shared torch module, its
parameter paths and every other clone of the MODEL stay as they were.

Every method (lora, lokr, loha) is an AdapterLayer subclass whose parameters are named by the suffix of
their key in the files ComfyUI loads (`lora_down.weight`, `lokr_w1`, `hada_w1_a`, ...). The weights of an
adapter are one dict `<module path>.<suffix> -> tensor`; a file holds the same tensors under
`lora_unet_<path with _>.<suffix>` plus `.alpha`. So the generic functions below serve every method, and a
method module only says which parameters a layer has and how they make ΔW.

DoRA (weight decomposition, Liu et al. 2024) is a magnitude on top of any method, saved as `.dora_scale`.
ComfyUI's loader (comfy/weight_adapter/base.py weight_decompose) applies a `(1, in)` dora_scale as the
paper defines it: W' = (W + ΔW) · m / ‖W + ΔW‖ with the norm over each input column. As the norm is per
input column, W' x = (W + ΔW)(s ⊙ x) with s = m / ‖W + ΔW‖: the layer's own forward on a rescaled input,
so DoRA stays activation-side. (PEFT's DoRA normalises output rows instead; ComfyUI would apply a
`(out, 1)` dora_scale with ‖W‖ rather than ‖W + ΔW‖, so files written that way would not load as trained.)
The norm is detached from the graph, as in PEFT and section 4.3 of the paper.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import AdapterSpec, quoted

FILE_PREFIX = "lora_unet_"
DORA_SUFFIX = "dora_scale"
_EPS = torch.finfo(torch.float32).eps   # what ComfyUI adds to the DoRA norm (it merges in float32)


def target_shape(target: tuple) -> tuple[int, ...]:
    """Weight shape of a target: (out, in) for a linear layer, (out, in, kh, kw) for a convolution."""
    _, in_features, out_features, *kernel = target
    return (int(out_features), int(in_features), *(int(k) for k in kernel))


def file_key(path: str, arch: str = "") -> str:
    """kohya's key of a target: `lora_unet_<path>` for the diffusion model's layers, `lora_te<n>_...` for a text
    encoder's (trainers/text_encoder.py)."""
    from .. import text_encoder
    if text_encoder.is_text_encoder(path):
        return text_encoder.file_key(path, arch)
    return FILE_PREFIX + path.replace(".", "_")


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """torch.nn.init.kaiming_uniform_(a=√5) (PEFT's init) drawn from `generator`: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(tensor[0].numel())
    tensor.copy_(torch.empty(tensor.shape).uniform_(-bound, bound, generator=generator).to(tensor.dtype))


def base_weight(layer: torch.nn.Module, device) -> torch.Tensor:
    """The layer's weight as its own forward uses it, in float32: through comfy.ops' cast (fp8, lowvram,
    weight functions of LoRAs stacked with the stock loader) for ComfyUI layers, dequantized for quantized
    ones (scaled fp8, nvfp4, int8)."""
    if hasattr(layer, "weight_function"):
        import comfy.ops
        from ..comfy_compat import dequantized
        # offloadable: under ComfyUI 0.33's dynamic VRAM the cast pins the layer's weight in VRAM until
        # uncast_bias_weight releases it (the legacy call never does), so what is returned must not alias it
        cast, bias, offload_stream = comfy.ops.cast_bias_weight(layer, device=device, dtype=torch.float32,
                                                                offloadable=True)
        weight = dequantized(layer, cast).to(device=device, dtype=torch.float32)
        if type(cast) is torch.Tensor and weight.data_ptr() == cast.data_ptr():
            weight = weight.clone()
        comfy.ops.uncast_bias_weight(layer, cast, bias, offload_stream)
        return weight
    return layer.weight.to(device=device, dtype=torch.float32)


class AdapterLayer(torch.nn.Module):
    """The trainable part of one adapted layer.

    Subclasses list their parameters in SUFFIXES (attribute -> key suffix, in parameter order; a layer may
    lack some, e.g. LoKr's w2 is full or a product) and define `diff_weight()`, ΔW scaled and shaped like
    the base weight; they may override `delta(x, layer)` with something cheaper than materialising ΔW."""

    SUFFIXES: dict[str, str] = {}
    active = True   # False (adapters_off): the layer runs as the model's own
    # parameters the forward only uses cast to the activations' dtype (see `cast_once`)
    CAST_ONCE: tuple[str, ...] = ()

    def __init__(self, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(shape)
        self.step_casts: dict[str, torch.Tensor] = {}
        for attr, suffix in self.SUFFIXES.items():
            value = torch.nn.Parameter(torch.zeros(shapes[suffix], dtype=dtype)) if suffix in shapes else None
            self.register_parameter(attr, value)
        self.magnitude = None   # DoRA: shape (1, in[, 1, 1]), registered by enable_dora

    # ------------------------------------------------------------------------------------------ parameters
    def tensors(self) -> dict[str, torch.nn.Parameter]:
        """suffix -> parameter, for the weights dict and the file."""
        out = {suffix: getattr(self, attr) for attr, suffix in self.SUFFIXES.items()
               if getattr(self, attr) is not None}
        if self.magnitude is not None:
            out[DORA_SUFFIX] = self.magnitude
        return out

    def enable_dora(self, dtype: torch.dtype) -> None:
        shape = (1, self.shape[1], *([1] * (len(self.shape) - 2)))
        self.magnitude = torch.nn.Parameter(torch.ones(shape, dtype=dtype))

    def init_magnitude(self, weight: torch.Tensor) -> None:
        """m = ‖W‖ per input column (+ ComfyUI's eps), so a new DoRA layer starts as the identity."""
        with torch.no_grad():
            self.magnitude.copy_(self._column_norm(weight.float()).view(self.magnitude.shape))

    @staticmethod
    def _column_norm(weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1) + _EPS

    def reset(self, generator: torch.Generator) -> None:
        raise NotImplementedError

    def diff_weight(self) -> torch.Tensor:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- forward
    def cast(self, attr: str, dtype: torch.dtype) -> torch.Tensor:
        """Parameter `attr` in `dtype`: the copy `cast_once` made for this micro-batch, else cast now."""
        cast = self.step_casts.get(attr)
        return cast if cast is not None and cast.dtype == dtype else getattr(self, attr).to(dtype)

    def delta(self, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        return functional(layer, x, self.diff_weight().to(x.dtype))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, base_forward: Callable) -> torch.Tensor:
        """The adapted layer's output for input x; `base_forward(x)` runs the layer's own forward."""
        if self.magnitude is not None:
            x = x * self.dora_input_scale(layer, x).to(x.dtype)
        out = base_forward(x)
        return out + self.delta(x, layer).to(out.dtype)

    def dora_input_scale(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """s = m / ‖W + ΔW‖ per input channel, shaped to broadcast over x."""
        with torch.no_grad():
            norm = self._column_norm(base_weight(layer, x.device) + self.diff_weight().float())
        scale = self.magnitude.float().view(-1) / norm
        return scale.view(-1, 1, 1) if len(self.shape) == 4 else scale


def functional(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x through `weight` the way `layer` applies its own weight (no bias): linear, or conv with the layer's
    stride, padding, dilation and groups."""
    if weight.ndim == 4:
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight)


class _CastAll(torch.autograd.Function):
    """Many tensors cast to one dtype by multi-tensor kernels; backward casts their gradients back."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.dtypes = [t.dtype for t in tensors]
        casts = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(casts, list(tensors))
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads):
        back = [torch.empty_like(g, dtype=d) for g, d in zip(grads, ctx.dtypes)]
        torch._foreach_copy_(back, list(grads))
        return (None, *back)


@contextlib.contextmanager
def cast_once(layers: dict[str, AdapterLayer], dtype: torch.dtype | None):
    """While training one micro-batch (its forward, and its backward, which recomputes checkpointed blocks):
    the adapters' CAST_ONCE parameters cast to `dtype` once, by a few multi-tensor kernels, instead of by one
    kernel at every use (the forward, the recomputation, and a cast of each gradient back). The same values
    as casting at each use; for SDXL's ~1400 LoRA tensors, thousands of tiny kernels fewer per step."""
    pairs = [] if dtype is None else [(layer, attr) for layer in layers.values() for attr in layer.CAST_ONCE
                                      if getattr(layer, attr) is not None and getattr(layer, attr).dtype != dtype]
    if not pairs:
        yield
        return
    casts = _CastAll.apply(dtype, *(getattr(layer, attr) for layer, attr in pairs))
    for (layer, attr), cast in zip(pairs, casts):
        layer.step_casts[attr] = cast
    try:
        yield
    finally:
        for layer, _ in pairs:
            layer.step_casts = {}


@contextlib.contextmanager
def adapters_off(layers: dict[str, AdapterLayer]):
    """The model's own output while inside: every adapter layer runs its base layer only (differential output
    preservation's base prediction). A Python switch read at each call, so a CUDA graph captures the layers
    switched off where they were off during the capture."""
    for layer in layers.values():
        layer.active = False
    try:
        yield
    finally:
        for layer in layers.values():
            layer.active = True


class PatchedForward:
    """Replaces a layer's `forward` while its clone is loaded: the adapter's `apply` around the layer's own
    forward (for most methods base output plus delta)."""

    def __init__(self, layer: torch.nn.Module, adapter: AdapterLayer, fp8=None):
        from ..comfy_compat import has_quantized_weight
        self.layer = layer
        self.adapter = adapter
        # a quantized layer runs dequantized under an adapter, as ComfyUI runs it under the stock loader's
        # patches (comfy_compat.dequantized_linear says why)
        self.dequantize = has_quantized_weight(layer)
        # fp8_compute (trainers/fp8.py): the base forward runs the layer's GEMMs in FP8 (the adapter does not);
        # where a call does not qualify, a quantized layer falls back to the dequantized product, as without it
        if fp8 is not None and self.dequantize:
            fp8 = type(fp8)(layer, fp8.gemm, dequantize=True)
        self.fp8 = fp8

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        if self.fp8 is not None and not args and not kwargs:
            base = self.fp8     # LoraLayer.apply reads its `weight` for its fused FP8 path
        elif self.dequantize:
            from ..comfy_compat import dequantized_linear
            base = lambda inp: dequantized_linear(layer, inp)  # noqa: E731
        else:
            base = lambda inp: type(layer).forward(layer, inp, *args, **kwargs)  # noqa: E731
        if not self.adapter.active:
            return base(x)
        return self.adapter.apply(layer, x, base)


class DeviceCached(torch.nn.Module):
    """Inference copy of an adapter layer for a sampled MODEL: weights moved to the input's device and
    dtype once and kept there, so sampling pays no per-call copies."""

    active = True

    def __init__(self, adapter: AdapterLayer):
        super().__init__()
        self.source = adapter
        self.copies: dict = {}

    def _copy(self, x: torch.Tensor) -> AdapterLayer:
        key = (x.device, x.dtype)
        layer = self.copies.get(key)
        if layer is None:
            layer = copy.deepcopy(self.source).to(device=x.device, dtype=x.dtype)
            self.copies = {key: layer}   # one device/dtype at a time
        return layer

    def delta(self, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        return self._copy(x).delta(x, layer)

    def apply(self, layer, x, base_forward):
        return self._copy(x).apply(layer, x, base_forward)


def object_patch_key(path: str) -> str:
    return f"diffusion_model.{path}.forward"


def install(patcher, layers: dict[str, AdapterLayer]) -> None:
    """Attach `layers` (module path -> adapter layer) to a ModelPatcher clone of a MODEL as object patches; text-
    encoder layers go on a CLIP's patcher instead (trainers/text_encoder.py)."""
    from ..text_encoder import split_layers
    root = patcher.model.diffusion_model
    for path, adapter in split_layers(layers)[0].items():
        patcher.add_object_patch(object_patch_key(path), PatchedForward(root.get_submodule(path), adapter))


# --------------------------------------------------------------------- the generic half of every method
# A method module defines its AdapterLayer subclass with `create(spec, target, shapes, dtype)` (shapes None:
# the method's own choice for a new layer; otherwise the shapes of loaded tensors, checked against the
# target); these functions do the rest.
BaseWeights = Callable[[str], torch.Tensor]


def build_layers(cls, spec: AdapterSpec, weights: dict[str, torch.Tensor] | None, dtype: torch.dtype,
                 device=None, base_weights: BaseWeights | None = None) -> dict[str, AdapterLayer]:
    """One layer per target. New layers (weights None) are initialised from spec.seed, DoRA magnitudes
    from `base_weights(path)`; otherwise each layer takes the shapes and values of its weights."""
    generator = torch.Generator().manual_seed(spec.seed)
    layers = {}
    for target in spec.targets:
        path = target[0]
        if weights is None:
            layer = cls.create(spec, target, None, dtype)
            layer.reset(generator)
            if spec.dora:
                if base_weights is None:
                    raise ValueError("a new DoRA adapter needs the MODEL's weights to start from")
                layer.enable_dora(dtype)
                layer.init_magnitude(base_weights(path))
        else:
            own = {s: weights[f"{path}.{s}"] for s in cls.SUFFIXES.values() if f"{path}.{s}" in weights}
            layer = cls.create(spec, target, {s: tuple(t.shape) for s, t in own.items()}, dtype)
            if spec.dora:
                layer.enable_dora(dtype)
                own[DORA_SUFFIX] = weights[f"{path}.{DORA_SUFFIX}"]
            with torch.no_grad():
                for suffix, param in layer.tensors().items():
                    param.copy_(own[suffix])
        layers[path] = layer.to(device) if device is not None else layer
    return layers


def layer_weights(layers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
    return {f"{path}.{suffix}": param.detach().to("cpu", copy=True)
            for path, layer in layers.items() for suffix, param in layer.tensors().items()}


def to_file_tensors(cls, spec: AdapterSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The weights under kohya keys (`lora_unet_<path>.<suffix>`) plus each layer's `.alpha`."""
    suffixes = (*cls.SUFFIXES.values(), DORA_SUFFIX)
    out = {}
    for target in spec.targets:
        path, key = target[0], file_key(target[0], spec.arch)
        for suffix in suffixes:
            if f"{path}.{suffix}" in weights:
                out[f"{key}.{suffix}"] = weights[f"{path}.{suffix}"].to(dtype)
        out[f"{key}.alpha"] = torch.tensor(float(spec.alpha_for(target)))
    return out


def from_file_tensors(cls, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for `spec.targets` from tensors under kohya keys (as `to_file_tensors` writes them); every
    layer is rebuilt from them, so a tensor of the wrong shape is an error naming the layer."""
    weights = {}
    for target in spec.targets:
        path, key = target[0], file_key(target[0], spec.arch)
        own = {s: tensors[f"{key}.{s}"].float() for s in cls.SUFFIXES.values() if f"{key}.{s}" in tensors}
        if not own:
            raise ValueError(f"the adapter file has no {spec.kind} weights for layer {quoted(path)}")
        layer = cls.create(spec, target, {s: tuple(t.shape) for s, t in own.items()}, torch.float32)
        if spec.dora:
            scale = tensors.get(f"{key}.{DORA_SUFFIX}")
            if scale is None:
                raise ValueError(f"the adapter file has no dora_scale for layer {quoted(path)}")
            layer.enable_dora(torch.float32)
            if scale.numel() != layer.magnitude.numel() or scale.shape[0] != 1:
                raise ValueError(f"dora_scale of layer {quoted(path)} has shape {tuple(scale.shape)}; expected "
                                 f"{tuple(layer.magnitude.shape)} (one magnitude per input channel)")
            own[DORA_SUFFIX] = scale.float().reshape(layer.magnitude.shape)
        weights.update({f"{path}.{s}": t for s, t in own.items()})
    return weights


def check_shapes(path: str, kind: str, shapes: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """A clear error when loaded tensors do not fit the layer they are for."""
    if shapes != expected:
        got = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        want = ", ".join(f"{k} {tuple(v)}" for k, v in expected.items())
        raise ValueError(f"{kind} weights of layer {quoted(path)} have shapes {got}; expected {want}")


class Method:
    """One adapter method, named by its layer class: built, stored and read like every other method."""

    def __init__(self, layer_class: type[AdapterLayer]):
        self.layer_class = layer_class

    def build_layers(self, spec: AdapterSpec, weights, dtype, device=None, base_weights=None) -> dict:
        return build_layers(self.layer_class, spec, weights, dtype, device, base_weights)

    layer_weights = staticmethod(layer_weights)

    def to_file_tensors(self, spec: AdapterSpec, weights, dtype) -> dict:
        return to_file_tensors(self.layer_class, spec, weights, dtype)

    def from_file_tensors(self, spec: AdapterSpec, tensors) -> dict:
        return from_file_tensors(self.layer_class, spec, tensors)
