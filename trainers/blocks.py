"""How a model's blocks run while training: recomputed in backward (gradient checkpointing) and, where the
model's code needs it, with its in-place residual updates made out of place.

ComfyUI writes its models for inference. Flux's blocks update their residual stream in place
(`img += attn_out`) after a LayerNorm saved that same tensor for backward, so autograd refuses the backward
("modified by an inplace operation"), and under checkpointing the block's input is changed by the first
forward, so the recomputation sees different values. `OutOfPlaceAugmentedAssignment` makes exactly those
statements — Python augmented assignments `a += b`, `a -= b`, `a *= b`, `a /= b` on tensors, while gradients
are on — build a new tensor and rebind the name, which is what `a = a + b` does. Explicit in-place calls
(`t.add_(x)`) keep their meaning. The math is the model's own code, so training sees what inference runs.
"""
from __future__ import annotations

import collections
import contextlib
import dis
import sys
import threading

import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

from .comfy_compat import comfy_sdpa_priority

_OUT_OF_PLACE = {
    torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub,
    torch.Tensor.mul_: torch.mul, torch.Tensor.div_: torch.div,
}
# Python 3.11+ compiles `a += b` to BINARY_OP with an in-place operator code (Include/opcode.h: NB_INPLACE_*).
_BINARY_OP = dis.opmap.get("BINARY_OP")
_INPLACE_CODES = {13, 18, 23, 24}            # +=, *=, -=, /=
_INPLACE_OPCODES = {dis.opmap[name] for name in ("INPLACE_ADD", "INPLACE_SUBTRACT", "INPLACE_MULTIPLY",
                                                 "INPLACE_TRUE_DIVIDE") if name in dis.opmap}   # Python < 3.11


def _is_augmented_assignment(frame) -> bool:
    code, offset = frame.f_code.co_code, frame.f_lasti
    opcode = code[offset]
    if opcode == _BINARY_OP:
        return code[offset + 1] in _INPLACE_CODES
    return opcode in _INPLACE_OPCODES


class OutOfPlaceAugmentedAssignment(TorchFunctionMode):
    """While active and grad mode is on, `a += b` on a tensor means `a = a + b` (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = _OUT_OF_PLACE.get(func)
        # Frame 1 is the Python code that ran the operator (this method is called from torch's C++ side).
        if out_of_place is not None and torch.is_grad_enabled() and _is_augmented_assignment(sys._getframe(1)):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


# Attention's forward kernels (every SDPA backend). Kept from the first forward of a checkpointed block: at
# Flux's 4.6k tokens attention is ~15% of a block's forward FLOPs, for ~30 MB saved per block.
_ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(torch.ops.aten, name))
# An adapter's rank-r projection (LoRA's x·downᵀ) is kept too: a product that reads a whole activation for an
# output of r columns (a few µs each, ~700 of them in an SDXL step), for rows × r values saved. The adapter marks
# it (kept_in_checkpoints): a product's shape cannot tell it from a narrow base layer, whose output the adapter
# then changes in place (torch's checkpoint refuses a kept tensor changed in place).
_PRODUCT_OPS = frozenset((torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                          torch.ops.aten.convolution.default))
_kept_products = threading.local()


@contextlib.contextmanager
def kept_in_checkpoints():
    """Matrix products and convolutions run inside are kept from a checkpointed block's forward instead of being
    recomputed in backward (with keep_attention)."""
    _kept_products.depth = getattr(_kept_products, "depth", 0) + 1
    try:
        yield
    finally:
        _kept_products.depth -= 1


def _kept(keep_attention: bool, keep_layers: bool, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    if ((keep_attention and op in _ATTENTION_OPS) or (op in _PRODUCT_OPS and getattr(_kept_products, "depth", 0))
            or (keep_layers and op is torch.ops.aten.convolution.default)):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# recompute_layers off: the outputs of a checkpointed block's convolutions (selective checkpointing's policy above)
# and of its LoRA Linear layers (LoraLinear) and FP8 GEMMs (fp8._Fp8Linear), kept from its first forward. A Linear
# layer's product and the adapter's in-place add into it are one output, which the policy cannot keep op by op
# (torch's checkpoint refuses a kept tensor changed in place): those are handed back, in order, to the
# recomputation, which skips computing them (kept_linear_outputs). Per thread: (mode "record" or "replay", the
# block's queue, the selective-checkpointing mode whose op counts the skipped products must not enter).
_linear_outputs = threading.local()


def kept_linear_outputs(compute):
    """compute() (a tuple of tensors: a Linear layer's output and what its backward needs) as it runs everywhere,
    except inside a checkpointed block with recompute_layers off: there the first forward keeps the tensors and
    the recomputation gets them back instead of computing them again. Selective checkpointing counts every op of
    a block to match its first forward with the recomputation, so compute() runs outside its mode in both. A
    tensor changed in place after the first forward (the adapters' fallback adding into a base output) has
    other values now: compute() runs again instead."""
    state = getattr(_linear_outputs, "state", None)
    if state is None:
        return compute()
    mode, queue, selective = state
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily
    if _get_current_dispatch_mode() is not selective:   # another mode above it: recompute as usual, both times
        if mode == "record":
            queue.append(None)
        else:
            queue.popleft()
        return compute()
    with _pop_mode_temporarily():
        if mode == "record":
            values = compute()
            queue.append((values, tuple(v._version for v in values)))
            return values
        entry = queue.popleft()
        if entry is None or any(v._version != version for v, version in zip(*entry)):
            return compute()
        # new tensor objects on the same memory: the first forward's outputs belong to the graph backward runs
        return tuple(v.detach() for v in entry[0])


class _LinearOutputsKept:
    """A checkpointed block's forward or recomputation context: selective checkpointing's mode, and the block's
    kept Linear outputs recorded (forward) or replayed (recomputation)."""

    def __init__(self, selective, mode: str, queue):
        self.selective, self.mode, self.queue = selective, mode, queue

    def __enter__(self):
        self.selective.__enter__()
        self.previous = getattr(_linear_outputs, "state", None)
        _linear_outputs.state = (self.mode, self.queue, self.selective)
        return self

    def __exit__(self, *exc):
        _linear_outputs.state = self.previous
        return self.selective.__exit__(*exc)


def _checkpoint_contexts(keep_attention: bool, keep_layers: bool):
    """torch's checkpoint `context_fn`: selective checkpointing that keeps attention (keep_attention) and the
    adapters' marked products, and with keep_layers the blocks' convolution and Linear outputs."""
    import functools
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    def contexts():
        forward, recompute = create_selective_checkpoint_contexts(functools.partial(_kept, keep_attention,
                                                                                    keep_layers))
        if not keep_layers:
            return forward, recompute
        # torch sets this on its own caching mode only; False is its default behaviour, without its warning
        forward.respect_saved_tensors_hooks = False
        queue = collections.deque()
        return _LinearOutputsKept(forward, "record", queue), _LinearOutputsKept(recompute, "replay", queue)
    return contexts


# The order in which training tries torch's SDPA backends (the first that supports the inputs runs), or None for
# the default below. Backward runs the backend its forward ran.
TRAINING_SDPA_PRIORITY: list | None = None


def training_sdpa_priority(device: torch.device) -> list | None:
    """TRAINING_SDPA_PRIORITY, else on Hopper and later GPUs cuDNN's fused attention first, else None (ComfyUI's
    and torch's own order). Measured on an H200 (docs/BENCHMARKS.md): cuDNN's attention is what torch 2.11 picks
    there by itself (ComfyUI 0.3.75 on Linux), and flash attention first, ComfyUI 0.33's order, made a training
    step 13-14 % slower (Flux-dev, SD 3.5 Large)."""
    if TRAINING_SDPA_PRIORITY:
        return TRAINING_SDPA_PRIORITY
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device) < (9, 0):
        return None
    from torch.nn.attention import SDPBackend
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_attention(device: torch.device):
    """The context a training micro-batch (forward and backward) runs in: training_sdpa_priority's backends, for
    torch's SDPA and for ComfyUI's wrapper around it."""
    order = training_sdpa_priority(device)
    if not order:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(order, set_priority=True))
    stack.enter_context(comfy_sdpa_priority(order))
    return stack


_attention_primed: set = set()


def prime_attention(device: torch.device, dtype: torch.dtype) -> None:
    """Runs one small attention forward and backward through ComfyUI's SDPA, once per process, device and dtype,
    before the first checkpointed step.

    Measured on an H200 with ComfyUI 0.33 (torch 2.11): the first attention calls of a process took another
    SDPA kernel than the same calls made later. A checkpointed block whose forward was among them recomputed
    with another kernel in backward, and the first step failed: "Trying to backward an extra time ...
    selective activation checkpoint" (SDXL), "_scaled_dot_product_flash_attention encountered during backward,
    but not found in storage" (SD 3.5 Large, Flux-dev), "cuDNN Frontend error: The dim for input_names::Stats
    is invalid" (attention recomputed). With this call first, all three trained; a process whose first
    training ran without checkpointing, or with CUDA graphs after its eager warm-up steps, never failed."""
    if device.type != "cuda" or (device, dtype) in _attention_primed:
        return
    import comfy.ops
    sdpa = getattr(comfy.ops, "scaled_dot_product_attention", torch.nn.functional.scaled_dot_product_attention)
    # 4 heads x 1024 tokens x 64: past the 131,072 elements from which ComfyUI 0.33 sets its backend priority
    q = torch.randn((1, 4, 1024, 64), device=device, dtype=dtype, requires_grad=True)
    with torch.enable_grad(), training_attention(device):
        sdpa(q, q.detach(), q.detach()).sum().backward()
    _attention_primed.add((device, dtype))


def spread(count: int, fraction: float) -> list[bool]:
    """Which of `count` blocks to checkpoint so that `fraction` of them are, spread evenly through the model."""
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(count)]


def _contiguous_if_permuted(value):
    """A tensor whose elements are dense in memory but in another order, as a contiguous copy; anything else
    (a broadcast view, which a copy would enlarge; a contiguous tensor; not a tensor) as it is."""
    if not isinstance(value, torch.Tensor) or value.is_contiguous() or 0 in value.stride():
        return value
    span = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
    return value.contiguous() if span == value.numel() else value


class TrainingBlockForward:
    """Object patch for a block's `forward` on the training clone of a MODEL. With `checkpoint`, the block is
    recomputed in backward, all but its attention and its adapters' rank-r projections when `keep_attention`
    (selective checkpointing), and all but its convolutions' and LoRA and FP8 Linear layers' outputs when
    `keep_layers`."""

    def __init__(self, module: torch.nn.Module, checkpoint: bool, out_of_place: bool, keep_attention: bool = False,
                 prefetcher=None, forward=None, contiguous_inputs: bool = False, keep_layers: bool = False):
        self.module = module
        # Architecture.contiguous_block_inputs: a permuted input is copied once here, before any checkpoint
        self.contiguous_inputs = contiguous_inputs
        # what runs the block while gradients are on: Architecture.training_block_forward's, else its own
        self.forward = forward or type(module).forward
        self.checkpoint = checkpoint
        self.out_of_place = out_of_place
        self.context_fn = (_checkpoint_contexts(keep_attention, keep_layers) if keep_attention or keep_layers
                           else None)
        # memory_budget_gb: stages the block's streamed weights, in the first pass and the recomputation alike
        self.prefetcher = prefetcher
        self.index = prefetcher.register(module) if prefetcher is not None else None

    def _forward(self, *args, **kwargs):
        staged = self.prefetcher.running(self.index) if self.prefetcher is not None else contextlib.nullcontext()
        with staged:
            if self.out_of_place:
                with OutOfPlaceAugmentedAssignment():
                    return self.forward(self.module, *args, **kwargs)
            return self.forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return type(self.module).forward(self.module, *args, **kwargs)
        if self.contiguous_inputs:
            args = tuple(_contiguous_if_permuted(a) for a in args)
            kwargs = {k: _contiguous_if_permuted(v) for k, v in kwargs.items()}
        if not self.checkpoint:
            return self._forward(*args, **kwargs)
        # Non-reentrant checkpointing. No RNG state to preserve (the diffusion models run without dropout) and
        # no metadata check on recompute: both cost host time per block, and SDXL at batch 1 is host-bound.
        extra = {"context_fn": self.context_fn} if self.context_fn else {}
        return torch.utils.checkpoint.checkpoint(self._forward, *args, use_reentrant=False,
                                                 preserve_rng_state=False, determinism_check="none", **extra,
                                                 **kwargs)
