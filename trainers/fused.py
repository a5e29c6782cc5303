"""Fused kernels for ComfyUI layers whose training time is memory traffic, not arithmetic.

SDXL's feed-forward is GEGLU (`comfy/ldm/modules/attention.py`): `x, gate = proj(x).chunk(2, -1)` then
`x * gelu(gate)`. The two halves are strided views of the projection, so PyTorch runs gelu, the product and
their three backward kernels on its non-vectorized path, and autograd saves gelu(gate) besides the projection;
an eager profile of an SDXL step put ~5.5 ms of its 82 ms there. One Triton kernel each way reads the
projection once: forward reads 2 and writes 1 inner-width row (eager: 5), backward reads 3 and writes 2
(eager: ~13), and only the projection is saved.

The math is ComfyUI's (exact, erf-based gelu) in fp32 registers, rounded once to the layer's dtype where
eager rounds after each op: results agree to the dtype's rounding. Without Triton, off CUDA, or on an input
the kernels do not take, `geglu` runs ComfyUI's own two ops.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# Off in the bench's A/B runs (`--no-fused-geglu`); the engine reads it when a training run starts.
ENABLED = True
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024


@functools.cache
def _kernels(interpret: bool = False):
    """The Triton kernels, built on first use; `interpret`: Triton's interpreter runs them on the CPU (tests)."""
    import triton
    import triton.language as tl
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as jit
    else:
        jit = triton.jit

    def geglu_forward(h_ptr, out_ptr, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        a = tl.load(h_ptr + row * 2 * inner + cols, mask=mask).to(tl.float32)
        g = tl.load(h_ptr + row * 2 * inner + inner + cols, mask=mask).to(tl.float32)
        out = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
        tl.store(out_ptr + row * inner + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    def geglu_backward(grad_ptr, h_ptr, grad_h_ptr, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        grad = tl.load(grad_ptr + row * inner + cols, mask=mask).to(tl.float32)
        a = tl.load(h_ptr + row * 2 * inner + cols, mask=mask).to(tl.float32)
        g = tl.load(h_ptr + row * 2 * inner + inner + cols, mask=mask).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327           # 1/sqrt(2π)
        grad_a = grad * g * cdf
        grad_g = grad * a * (cdf + g * pdf)
        tl.store(grad_h_ptr + row * 2 * inner + cols, grad_a.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_h_ptr + row * 2 * inner + inner + cols, grad_g.to(grad_h_ptr.dtype.element_ty), mask=mask)

    return jit(geglu_forward), jit(geglu_backward)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:   # not installed, or a build that cannot load here
        return False
    return True


def _grid(rows: int, inner: int):
    return rows, math.ceil(inner / _BLOCK)


class _FusedGEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projection: torch.Tensor) -> torch.Tensor:
        inner = projection.shape[-1] // 2
        out = projection.new_empty(*projection.shape[:-1], inner)
        forward_kernel, _ = _kernels(not projection.is_cuda)
        forward_kernel[_grid(projection.numel() // (2 * inner), inner)](projection, out, inner, BLOCK=_BLOCK)
        ctx.save_for_backward(projection)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projection,) = ctx.saved_tensors
        inner = projection.shape[-1] // 2
        grad = grad.contiguous()
        grad_projection = torch.empty_like(projection)
        _, backward_kernel = _kernels(not projection.is_cuda)
        backward_kernel[_grid(projection.numel() // (2 * inner), inner)](grad, projection, grad_projection, inner,
                                                                           BLOCK=_BLOCK)
        return grad_projection


def takes(projection: torch.Tensor, interpret: bool = False) -> bool:
    """Whether the fused kernels run on this GEGLU projection (else ComfyUI's ops do)."""
    return (triton_available() and (projection.is_cuda or interpret) and projection.is_contiguous()
            and projection.dtype in _DTYPES and projection.shape[-1] % 2 == 0 and projection.numel() > 0)


def reference_geglu(projection: torch.Tensor) -> torch.Tensor:
    """ComfyUI's GEGLU after its projection (comfy/ldm/modules/attention.py)."""
    x, gate = projection.chunk(2, dim=-1)
    return x * F.gelu(gate)


def geglu(projection: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """`x * gelu(gate)` for `x, gate = projection.chunk(2, -1)`, fused where `takes` says so."""
    if takes(projection, interpret):
        return _FusedGEGLU.apply(projection)
    return reference_geglu(projection)


class FusedGEGLUForward:
    """An object patch for a ComfyUI GEGLU module's `forward`: its projection (adapter included, through that
    layer's own patch), then the fused gate."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(self.module.proj(x))


def usable_on(device: torch.device) -> bool:
    """Whether a training run on `device` patches GEGLU layers with the fused kernels."""
    return ENABLED and torch.device(device).type == "cuda" and triton_available()
