"""What differs between the ComfyUI versions the pack supports (0.3.75 and 0.33): the one place that knows.

Each difference is found from ComfyUI itself (a field or attribute that exists or not), never from a
version string, so a ComfyUI between the two works as far as it has each feature. Imports nothing from the
pack: the test-only node pack (tests/eri_test_nodes) loads this file by its path.
"""
from __future__ import annotations

import contextlib
import functools
import dataclasses
import sys

import torch

import comfy.model_management

# Flux.1's value of the fields that newer ComfyUI's FluxParams requires and older ones do not accept
# (model_detection.py gives a Flux.1 checkpoint these): `txt_ids_dims` (0.33) lists the text position axes
# that count up; Flux.1 has none.
_FLUX_1_FIELDS = {"txt_ids_dims": []}
# Chroma's: 0.33's ChromaParams also requires `vec_in_dim` (Chroma has no pooled vector input).
_CHROMA_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None}
# Flux.2's (model_detection.py in 0.33): its text positions count up along the fourth rope axis.
_FLUX_2_FIELDS = {"txt_ids_dims": [3]}


def pinned_memory_disabled() -> bool:
    """ComfyUI's --disable-pinned-memory (0.3.75 and 0.33 alike; absent from older versions: not disabled)."""
    import comfy.cli_args
    return bool(getattr(comfy.cli_args.args, "disable_pinned_memory", False))


def flux_config(config: dict) -> dict:
    """A Flux.1 unet config (as model_detection finds it in 0.3.75) completed for this ComfyUI's FluxParams."""
    import comfy.ldm.flux.model   # here, not at the top: the training loop imports this module too
    accepted = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**{k: v for k, v in _FLUX_1_FIELDS.items() if k in accepted}, **config}


def flux2_config(config: dict) -> dict:
    """A Flux.2 unet config (as model_detection finds it in 0.3.75) completed for this ComfyUI's FluxParams."""
    import comfy.ldm.flux.model
    accepted = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**{k: v for k, v in _FLUX_2_FIELDS.items() if k in accepted}, **config}


def chroma_config(config: dict) -> dict:
    """A Chroma unet config (as model_detection finds it in 0.3.75) completed for this ComfyUI's ChromaParams."""
    import comfy.ldm.chroma.model
    accepted = {f.name for f in dataclasses.fields(comfy.ldm.chroma.model.ChromaParams)}
    return {**{k: v for k, v in _CHROMA_FIELDS.items() if k in accepted}, **config}


@contextlib.contextmanager
def training_mode():
    """ComfyUI's own flag for "a model is being trained" (0.33: `model_management.in_training`), set for the
    block: with it, models and ops take their autograd-safe paths (Flux's rotary embedding without
    comfy-kitchen's inference kernel, no INT8 activation fusion). Restored afterwards, also on errors and
    Cancel; ComfyUI without the flag needs nothing."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


@contextlib.contextmanager
def comfy_sdpa_priority(order: list):
    """ComfyUI's SDPA backend order replaced by `order` for the block. ComfyUI 0.33 wraps every attention call
    in `sdpa_kernel(comfy.ops.SDPA_BACKEND_PRIORITY, set_priority=True)` (flash first), which overrides an order
    set around the call; 0.3.75 sets one only on Windows. Restored afterwards, also on errors and Cancel."""
    import comfy.ops
    current = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    if current is None:
        yield
        return
    comfy.ops.SDPA_BACKEND_PRIORITY = list(order)
    try:
        yield
    finally:
        comfy.ops.SDPA_BACKEND_PRIORITY = current


@contextlib.contextmanager
def comfy_rope(rotate):
    """ComfyUI's rotary embedding, `apply_rope1(x, freqs_cis)` and `apply_rope(xq, xk, freqs_cis)` of
    comfy/ldm/flux/math.py, computed by `rotate(x, freqs_cis)` for the block, ComfyUI's own code where it returns
    None. Flux's attention looks the functions up in that module; Lumina, Qwen-Image and other models import them
    by name, so every loaded comfy.ldm module holding them is patched too. Restored afterwards, also on errors and
    Cancel."""
    import comfy.ldm.flux.math as flux_math
    original_rope1, original_rope = flux_math.apply_rope1, flux_math.apply_rope

    def apply_rope1(x, freqs_cis):
        out = rotate(x, freqs_cis)
        return original_rope1(x, freqs_cis) if out is None else out

    def apply_rope(xq, xk, freqs_cis):
        return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)

    replaced = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "comfy.ldm" or name.startswith("comfy.ldm.")):
            continue
        for attr, original, replacement in (("apply_rope1", original_rope1, apply_rope1),
                                            ("apply_rope", original_rope, apply_rope)):
            if getattr(module, attr, None) is original:
                setattr(module, attr, replacement)
                replaced.append((module, attr, original))
    try:
        yield
    finally:
        for module, attr, original in replaced:
            setattr(module, attr, original)


def is_linear(module) -> bool:
    """A linear layer adapters can wrap: a torch Linear (ComfyUI's plain, manual-cast and fp8 ops, and 0.3.75's
    scaled-fp8 op subclass it), or the Linear of ComfyUI's quantized ops (`MixedPrecisionOps`: scaled fp8 as
    0.33 converts old files on load, nvfp4, int8, ...), which is a plain Module holding a QuantizedTensor
    weight of the layer's logical (out, in) shape and casting it in its own forward."""
    if isinstance(module, torch.nn.Linear):
        return True
    import comfy.ops
    return (isinstance(module, comfy.ops.CastWeightBiasOp) and type(module).__name__ == "Linear"
            and isinstance(getattr(module, "in_features", None), int)
            and getattr(module, "weight", None) is not None and len(module.weight.shape) == 2)


def dequantized(layer, weight):
    """`weight` (a layer's weight as comfy.ops casts it, possibly still stored quantized) as the plain tensor
    the layer's forward multiplies by: a QuantizedTensor dequantized (0.33 returns it undequantized when it
    already reports the requested dtype), times the per-tensor scale of 0.3.75's scaled-fp8 op
    (`scale_weight`, which its forward applies itself and cast_bias_weight leaves out)."""
    if isinstance(weight, _quantized_tensor_class()):
        weight = weight.dequantize()
    scale = getattr(layer, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(device=weight.device, dtype=weight.dtype)
    return weight


def _quantized_tensor_class() -> type | tuple:
    """ComfyUI's QuantizedTensor (comfy/quant_ops.py, from comfy-kitchen in 0.33); () where there is none."""
    try:
        import comfy.quant_ops
    except ImportError:
        return ()
    return getattr(comfy.quant_ops, "QuantizedTensor", ())


def has_quantized_weight(layer) -> bool:
    """The layer keeps its weight as a QuantizedTensor (ComfyUI's MixedPrecisionOps)."""
    return isinstance(getattr(layer, "weight", None), _quantized_tensor_class())


def fp8_tensorwise(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e4m3 data, fp32 scale) of a QuantizedTensor weight stored as e4m3 with one scale per tensor (0.3.75's
    float8_e4m3fn layout, 0.33's TensorCoreFP8Layout, scaled fp8 files as 0.33 converts them), whose dequantized
    value is data · scale; None for any other weight (e5m2, block-scaled MXFP8, nvfp4, int8, plain tensors)."""
    if not isinstance(weight, _quantized_tensor_class()):
        return None
    data = getattr(weight, "_qdata", None)
    params = getattr(weight, "_params", None) or getattr(weight, "_layout_params", None)   # 0.33, 0.3.75
    scale = params.get("scale") if isinstance(params, dict) else getattr(params, "scale", None)
    if (not isinstance(data, torch.Tensor) or data.dtype != torch.float8_e4m3fn
            or tuple(data.shape) != tuple(weight.shape) or not isinstance(scale, torch.Tensor) or scale.numel() != 1
            or not scale.is_floating_point()):
        return None
    return data, scale


def dequantized_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """A quantized Linear's output for x computed with its weight dequantized to x's dtype: how ComfyUI runs
    such a layer while weight patches (the stock LoRA loader's, on a GPU's dynamic VRAM or in lowvram mode)
    apply to it. Its own forward otherwise takes the quantized matmul, which also quantizes the input (int8;
    fp8 and nvfp4 where the GPU computes in them) and so would not give what the stock loader shows for the
    trained adapter. Casting goes through comfy.ops, so offloaded weights and stacked LoRAs' weight functions
    apply as in ComfyUI's forward."""
    import comfy.ops
    pre_quant_scale = getattr(layer, "pre_quant_scale", None)   # ModelOpt AWQ smoothing, as the forward does
    if pre_quant_scale is not None:
        x = x * pre_quant_scale.to(device=x.device, dtype=x.dtype)
    weight, bias, offload_stream = comfy.ops.cast_bias_weight(layer, x, offloadable=True)
    out = torch.nn.functional.linear(x, dequantized(layer, weight).to(x.dtype), bias)
    comfy.ops.uncast_bias_weight(layer, weight, bias, offload_stream)
    return out


def trainable_patcher(patcher):
    """The ModelPatcher training runs on. ComfyUI 0.33's dynamic VRAM patcher (`ModelPatcherDynamic`, its default
    on NVIDIA) keeps weights in host memory and streams each layer's through comfy-aimdo at every call, so a
    trained layer's weight has no fixed address (CUDA graphs, fused kernels) and autograd would hold every streamed
    copy: training takes ComfyUI's own answer for what dynamic loading cannot do, the model's non-dynamic delegate
    (the same file loaded once more by the legacy ModelPatcher, with this patcher's patches; its samplers do the
    same for hooks), cached on the patcher for the next run. Every other patcher is returned as it is. Either way
    its weights are in the dtypes ComfyUI meant for them (weights_in_model_dtype)."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    if is_dynamic is not None and is_dynamic():
        if getattr(patcher, "cached_patcher_init", None) is None:
            raise RuntimeError("this MODEL is on ComfyUI's dynamic VRAM and its loader left no way to load it again "
                               "without it, which training needs: load it with ComfyUI's Load Checkpoint or Load "
                               "Diffusion Model node, or start ComfyUI with --disable-dynamic-vram")
        patcher = patcher.get_non_dynamic_delegate()
    weights_in_model_dtype(patcher.model)
    return patcher


def weights_in_model_dtype(model: torch.nn.Module) -> int:
    """Gives each weight that ComfyUI 0.33 left in its file's dtype the dtype ComfyUI meant for it; returns how
    many. With dynamic VRAM on (comfy-aimdo), comfy.ops' Linear and Embedding are made without weights and take
    the file's tensors as they are, the meant dtype kept in `<name>_comfy_model_dtype`: the dynamic patcher casts
    them at every call, but a legacy patcher's load (the non-dynamic delegate training runs on) uses them as they
    are, so a bf16 file under an fp16 SDXL fails in its first Linear ("mat1 and mat2 must have the same dtype").
    A load with --disable-dynamic-vram copies the file into the model's dtype; this gives the same tensors, once
    per loaded model (the delegate is cached). Layers that cast at each call (manual cast, fp8, lowvram) and
    quantized weights are left as they are."""
    converted = 0
    with torch.inference_mode(False):
        for module in model.modules():
            if getattr(module, "comfy_cast_weights", True):   # not a comfy.ops layer, or one that casts per call
                continue
            for name, param in list(module._parameters.items()):
                meant = getattr(module, f"{name}_comfy_model_dtype", None)
                if (param is None or meant is None or param.dtype == meant or type(param.data) is not torch.Tensor
                        or not param.is_floating_point()):
                    continue
                module._parameters[name] = torch.nn.Parameter(param.data.to(meant), requires_grad=param.requires_grad)
                converted += 1
    return converted


def rms_norm_parameters(module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of one of ComfyUI's RMSNorm modules, as its forward passes them to torch's `rms_norm` (the
    weight cast to the input's dtype there); None where its forward would compute something else (a weight or
    bias function, a quantized or absent weight, torch without a fused `rms_norm`, an unknown subclass).
    0.33: comfy.ops' RMSNorm (torch.nn.RMSNorm: eps None is torch's default, float32's epsilon); 0.3.75: Flux's
    own RMSNorm (weight `scale`, eps 1e-6); both: MMDiT's RMSNorm (SD 3.5's q/k norms)."""
    import comfy.ops
    import comfy.rmsnorm
    from comfy.ldm.modules.diffusionmodules import mmdit
    flux_rms_norm = getattr(__import__("comfy.ldm.flux.layers", fromlist=["RMSNorm"]), "RMSNorm", None)
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return None
    forward = type(module).forward
    if isinstance(module, torch.nn.RMSNorm) and forward in (torch.nn.RMSNorm.forward,
                                                            getattr(comfy.ops.disable_weight_init, "RMSNorm",
                                                                    torch.nn.RMSNorm).forward):
        weight, eps = module.weight, (torch.finfo(torch.float32).eps if module.eps is None else module.eps)
    elif getattr(comfy.rmsnorm, "rms_norm_torch", True) is None:
        return None     # (0.3.75 on a torch without F.rms_norm computes it by hand)
    elif type(module) is mmdit.RMSNorm:
        weight, eps = module.weight, module.eps
    elif flux_rms_norm is not None and type(module) is flux_rms_norm:
        weight, eps = module.scale, 1e-6
    else:
        return None
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return weight, float(eps)


# ComfyUI's Flux block forwards that trainers/arch/flux.py's training forwards reproduce, by the sha256 of their
# dedented source: 0.3.75's and 0.33's. Another version's blocks (changed code) keep their own forward.
_KNOWN_FLUX_BLOCK_FORWARDS = {
    "DoubleStreamBlock": {"03e57d251ab49a6edefb0400e20142c1170bf55a96c26429a99dfc8457a186f7",
                          "7311569ba14cccb79ec7a14190e3980e77a5e2c86c11cc421f988ee3d1472c59"},
    "SingleStreamBlock": {"3f63422de8eab06336ff31b8ee82b9ebbb3ab7ad870555b5b907e4808d1a19ad",
                          "0a79a7f4b0ed0598aaa39388484046d2eca88c48e67e5f6917dab984f3b551b6"},
}


@functools.cache
def _source_sha256(function) -> str | None:
    import hashlib
    import inspect
    import textwrap
    try:
        return hashlib.sha256(textwrap.dedent(inspect.getsource(function)).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def known_flux_block(block: torch.nn.Module) -> bool:
    """Whether `block` is one of ComfyUI's Flux DoubleStreamBlock / SingleStreamBlock (the Flux family's, Flux.2's)
    whose forward is the code trainers/arch/flux.py reproduces."""
    import comfy.ldm.flux.layers as layers
    cls = type(block)
    if cls not in (layers.DoubleStreamBlock, layers.SingleStreamBlock):
        return False
    return _source_sha256(cls.forward) in _KNOWN_FLUX_BLOCK_FORWARDS[cls.__name__]


# MMDiT's (SD 3.5) functions that trainers/arch/sd3.py's training forward reproduces: JointBlock.forward,
# block_mixing, _block_mixing, DismantledBlock.pre_attention, SelfAttention.pre_attention and split_qkv, by the
# sha256 of their dedented source, the same in 0.3.75 and 0.33.
_KNOWN_MMDIT_SOURCES = frozenset({
    "0d56643009f164f597a0f6ae2b5ec2309a3ec86a8c6ccb34ea699a975eef23db",
    "1398d391022060a76fcaaf51bdf2f69f32b7401d90ead375f4f8d61e1ca7e118",
    "3be6160ed40b34d1e0fc7e5321c2ac4008a1b18e69e8b17fe2a1dc313059f7a8",
    "ad33ecc423e86c908a17274b027d398c4ed2fc22921f6d74ce604866de90413e",
    "c70868e41cb3909a171310f8cab18bedc2ed23ed2e19e1349131b1a2fe8c6fa4",
    "f2a52a32d38d40d2707a75def2d7009f95583900ebfefa1fc9aaca600218c92a",
})


def mmdit_sources() -> frozenset:
    from comfy.ldm.modules.diffusionmodules import mmdit
    return frozenset(_source_sha256(function) for function in (
        mmdit.JointBlock.forward, mmdit.block_mixing, mmdit._block_mixing, mmdit.DismantledBlock.pre_attention,
        mmdit.SelfAttention.pre_attention, mmdit.split_qkv))


def known_mmdit_block(block: torch.nn.Module) -> bool:
    """Whether `block` is MMDiT's JointBlock and its code is what trainers/arch/sd3.py reproduces."""
    from comfy.ldm.modules.diffusionmodules import mmdit
    return type(block) is mmdit.JointBlock and mmdit_sources() <= _KNOWN_MMDIT_SOURCES
