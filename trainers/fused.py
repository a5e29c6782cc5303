"""Fused kernels for ComfyUI layers whose training time is memory traffic, not arithmetic.

GEGLU. SDXL's feed-forward is GEGLU (`comfy/ldm/modules/attention.py`): `x, gate = proj(x).chunk(2, -1)` then
`x * gelu(gate)`. The two halves are strided views of the projection, so PyTorch runs gelu, the product and
their three backward kernels on its non-vectorized path, and autograd saves gelu(gate) besides the projection;
an eager profile of an SDXL step put ~5.5 ms of its 82 ms there. One Triton kernel each way reads the
projection once: forward reads 2 and writes 1 inner-width row (eager: 5), backward reads 3 and writes 2
(eager: ~13), and only the projection is saved.

The math is ComfyUI's (exact, erf-based gelu) in fp32 registers, rounded once to the layer's dtype where
eager rounds after each op: results agree to the dtype's rounding. Without Triton, off CUDA, or on an input
the kernels do not take, `geglu` runs ComfyUI's own two ops.

GroupNorm. SDXL's ResBlocks and SpatialTransformers normalise over 32 groups: at batch 1 PyTorch's CUDA kernel
computes each group's statistics with one thread block, 32 blocks on a 132-multiprocessor GPU, ~64 µs a call
(5.4 ms of an SDXL step with checkpointing). Here each group is split over blocks of 4096 elements whose partial
mean and squared deviations are combined (Chan et al.) by a second kernel; the normalisation is PyTorch's own
arithmetic: mean and 1/std rounded to the input's dtype as its kernel stores them, then x·a + b in fp32 with
a = rstd·γ, b = β − a·mean. Backward is PyTorch's `native_group_norm_backward` on those statistics, so the
gradients are computed exactly as for the eager layer.

Rotary embedding. The Flux family (Flux, Kontext, Chroma, Flux.2), Qwen-Image and Lumina (Z-Image) rotate q and
k by ComfyUI's `apply_rope1` (comfy/ldm/flux/math.py): the bf16 head is cast to an fp32 copy, multiplied,
`addcmul_`-ed and cast back, and its backward adds a sum reduction, four to five full fp32 passes over q and k
in each direction. While training, 0.33 takes this eager path (its inference kernel has no backward) and 0.3.75
has no other. An H200 profile of a Flux-dev step put ~80 ms of its 0.53 s there (forward, recomputation and
backward). Here one kernel each way reads the head once and writes it once, with the same fp32 arithmetic in
registers: out_i = fma(f[i,1], x1, f[i,0]·x0), as torch's addcmul with value 1 computes it, and in backward
gx_j = g0·f[0,j] + g1·f[1,j] unfused, as autograd's product and sum do, each rounded to the rotations' dtype
where ComfyUI's tensors are (Qwen-Image passes bf16 ones); so results are torch's bit for bit.

GELU (tanh) on a strided view. The Flux family's single blocks split one projection into q/k/v and the MLP's
input and run `nn.GELU(approximate="tanh")` on that strided slice, which PyTorch computes on its non-vectorized
path (an H200 profile of an FP8 Flux-dev step: 12 ms forward and recomputation, 7 ms backward). One kernel each
way reads the slice's rows in place and writes contiguous rows, with torch's CUDA arithmetic in fp32 registers
(`GeluCUDAKernelImpl`: libdevice's tanhf, an fma exactly where nvcc contracts one), so results are torch's bit
for bit.

Concatenations. A Flux double block concatenates its text and image q, k and v for joint attention, and a single
block its attention output with its MLP's activation as its second Linear's input: torch.cat copies each part
once more. In backward, autograd assembles each qkv projection's gradient from q's, k's and v's by a stack and a
copy into the projection's layout, and a single block's projection's gradient by one more concatenation with
the MLP's. `joint_attention_inputs` normalises the q (k) parts straight into their concatenation and copies v's
heads into theirs; `single_block_inputs` and `cat_gelu_tanh` write the GELU straight beside the attention output;
and backward writes each projection's gradient once, each part in its place (the norm's backward and the GELU's
writing theirs there). trainers/arch/flux.py's block forwards call them; MMDiT's joint blocks (SD 3.5) have the
same concatenation of context and x, which `mmdit_joint_attention_inputs` writes in place the same way
(trainers/arch/sd3.py). The same kernels, the same bits, minus the copies: in an H200 profile of an FP8 Flux-dev
step, copies and concatenations fell from 36.6 ms to 10.1.

A copy where a device flag is set. The flat AdamW8bit (trainers/optim.py) skips a NaN step on the device as
torch's fused AdamW does, but bitsandbytes' kernel takes no flag: the weights and state it writes are kept
before its step and put back after it where the flag is set. `copy_if_flagged` reads the flag first and moves no
bytes when it is zero, which is every step that trains; a clone and a `torch.where` read and write the whole
state every step (an H200 SDXL LoRA step: 2.73 ms of GPU time between graph replays, against AdamW's 2.27).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F

try:    # module-level: Triton's interpreter finds `tl` among the kernels' globals
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:   # not installed, or a build that cannot load here: ComfyUI's own ops run
    triton = tl = libdevice = None
# TRITON_INTERPRET=1 before Triton is imported (the CPU tests set it): every kernel, Triton's own library
# functions included, runs in Triton's interpreter, and `interpret=True` below takes CPU tensors.
INTERPRETING = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"

# Which fused forwards a training run patches in, and whether AdamW8bit's skip copies through copy_if_flagged.
# ERI_FUSED_KERNELS=0 in ComfyUI's environment turns them all off (ComfyUI's own ops then run, as without
# Triton; AdamW8bit keeps its state with a clone); the bench's A/B runs turn each off (`--no-fused-geglu`,
# `--no-fused-group-norm`, `--no-fused-rope`). Read when a training run starts (the rotary embedding's at each
# micro-batch, the flag copy's at each step).
_ON = os.environ.get("ERI_FUSED_KERNELS", "1") != "0"
ENABLED = {"geglu": _ON, "group_norm": _ON, "rope": _ON, "gelu": _ON, "rms_norm": _ON, "concat": _ON,
           "flag_copy": _ON}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024          # GEGLU: columns per program (fewer for narrower layers)
_GROUP_BLOCK = 4096    # GroupNorm: elements of a group per program (fewer for smaller groups)
ROPE_ROWS = 16         # rotary embedding: heads' rows (of head_dim elements) per program
_GELU_BLOCK = 2048     # GELU (tanh): columns per program (fewer for narrower rows)
RMS_ROWS = 16          # RMSNorm: rows per program
# torch's constants for GELU (tanh) in fp32: kBeta = sqrt(2)·(2/sqrt(pi))·0.5 and kKappa rounded to float, and
# 3·kKappa as the compiler folds it (a float product)
_GELU_BETA = float(torch.tensor(math.sqrt(2) * (2 / math.sqrt(math.pi)) * 0.5, dtype=torch.float32))
_GELU_KAPPA = float(torch.tensor(0.044715, dtype=torch.float32))
_GELU_KAPPA3 = float(torch.tensor(3.0, dtype=torch.float32) * torch.tensor(0.044715, dtype=torch.float32))


def _power_of_two(size: int) -> int:
    """The smallest power of two ≥ size, at least 16 (Triton's block shapes are powers of two)."""
    return max(16, 1 << (size - 1).bit_length())


def _block(size: int, largest: int) -> int:
    return min(largest, _power_of_two(size))


if triton is not None:    # (module level: the kernels below find it among their globals)

    @triton.jit
    def _tanh(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.tanh(x)        # CUDA's tanhf, as torch's kernels call it
        else:                               # Triton's interpreter runs no libdevice: (1 - e)/(1 + e), e = e^-2|x|
            e = tl.exp(-2.0 * tl.abs(x))
            return tl.where(x < 0, -1.0, 1.0) * ((1.0 - e) / (1.0 + e))


    @triton.jit
    def _rsqrt(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.rsqrt(x)       # CUDA's rsqrtf, as torch's norms call it
        else:
            return 1.0 / tl.sqrt(x)

    @triton.jit
    def _four(t, ROWS: tl.constexpr):
        # the 4 elements (axis 2) of each lane of t (ROWS, 32, 4), as 4 tensors (ROWS, 32)
        even, odd = tl.split(tl.reshape(t, (ROWS, 32, 2, 2)))       # (e0, e2), (e1, e3)
        e0, e2 = tl.split(even)
        e1, e3 = tl.split(odd)
        return e0, e1, e2, e3

    @triton.jit
    def _lane_sums(first, a, b, ROWS: tl.constexpr):
        # per lane: first[0] + a[1]·b[1] + a[2]·b[2] + a[3]·b[3], left to right, each product with its sum one
        # fma (nvcc's contraction of `sum += a * b`)
        f0, _, _, _ = _four(first, ROWS)
        _, a1, a2, a3 = _four(a, ROWS)
        _, b1, b2, b3 = _four(b, ROWS)
        return tl.fma(a3, b3, tl.fma(a2, b2, tl.fma(a1, b1, f0)))

    @triton.jit
    def _warp_tree(s, ROWS: tl.constexpr):
        # a warp's shuffle-down sum of its 32 lanes: lane i adds lane i + 16, then i + 8, ... (each a sum of two)
        s = tl.sum(tl.reshape(s, (ROWS, 2, 16)), axis=1)
        s = tl.sum(tl.reshape(s, (ROWS, 2, 8)), axis=1)
        s = tl.sum(tl.reshape(s, (ROWS, 2, 4)), axis=1)
        s = tl.sum(tl.reshape(s, (ROWS, 2, 2)), axis=1)
        return tl.sum(s, axis=1)


@functools.cache
def _kernels():
    """The Triton kernels, built on first use (interpreted under TRITON_INTERPRET=1)."""
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

    def group_norm_partial_stats(x_ptr, mean_ptr, m2_ptr, group_size, splits, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)         # one (sample, group)
        chunk = tl.program_id(1)
        offsets = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < group_size
        x = tl.load(x_ptr + row * group_size + offsets, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(group_size - chunk * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        deviation = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row * splits + chunk, mean)
        tl.store(m2_ptr + row * splits + chunk, tl.sum(deviation * deviation, axis=0))

    def group_norm_stats(part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, group_size, splits, eps,
                         BLOCK: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        chunks = tl.arange(0, SPLITS)
        mask = chunks < splits
        part_mean = tl.load(part_mean_ptr + row * splits + chunks, mask=mask, other=0.0)
        part_m2 = tl.load(part_m2_ptr + row * splits + chunks, mask=mask, other=0.0)
        counts = tl.where(mask, tl.minimum(group_size - chunks * BLOCK, BLOCK), 0).to(tl.float32)
        mean = tl.sum(counts * part_mean, axis=0) / group_size
        spread = part_mean - mean
        m2 = tl.sum(part_m2 + counts * spread * spread, axis=0)
        rstd = 1.0 / tl.sqrt(m2 / group_size + eps)
        tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
        tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))

    def group_norm_apply(x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, group_size, hw, channels_per_group,
                         groups, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < group_size
        mean = tl.load(mean_ptr + row).to(tl.float32)
        rstd = tl.load(rstd_ptr + row).to(tl.float32)
        channel = (row % groups) * channels_per_group + offsets // hw
        scale = rstd * tl.load(weight_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32) - scale * mean
        x = tl.load(x_ptr + row * group_size + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * group_size + offsets, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)

    def rope_rows(x_ptr, f_ptr, out_ptr, rows, d1, d2, xs0, xs1, xs2, fs0, fs1, fs2,
                  HALF: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr, ROUND: tl.constexpr):
        # rows index x's three leading dims (strides xs*, freqs' broadcast ones with stride 0); out is contiguous.
        # ComfyUI computes in freqs' dtype: with ROUND (bf16/fp16 freqs, as Qwen-Image passes) each product and
        # sum is rounded to it, as torch's kernels store them.
        compute = f_ptr.dtype.element_ty
        r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        i0, i1, i2 = r // (d1 * d2), (r // d2) % d1, r % d2
        row_mask = (r < rows)[:, None]
        cols = tl.arange(0, 2 * HALF)[None, :]
        x = tl.load(x_ptr + (i0 * xs0 + i1 * xs1 + i2 * xs2)[:, None] + cols, mask=row_mask)
        x0, x1 = tl.split(tl.reshape(x.to(compute).to(tl.float32), (ROWS, HALF, 2)))
        f_cols = tl.arange(0, 4 * HALF)[None, :]
        f = tl.load(f_ptr + (i0 * fs0 + i1 * fs1 + i2 * fs2)[:, None] + f_cols, mask=row_mask).to(tl.float32)
        f_j0, f_j1 = tl.split(tl.reshape(f, (ROWS, HALF, 2, 2)))     # f[..., i, 0], f[..., i, 1]
        f00, f10 = tl.split(f_j0)
        f01, f11 = tl.split(f_j1)
        if BACKWARD:    # x is the output's gradient: the transposed rotation, products then their sum
            p00, p10, p01, p11 = x0 * f00, x1 * f10, x0 * f01, x1 * f11
            if ROUND:
                p00, p10 = p00.to(compute).to(tl.float32), p10.to(compute).to(tl.float32)
                p01, p11 = p01.to(compute).to(tl.float32), p11.to(compute).to(tl.float32)
            y0 = p00 + p10
            y1 = p01 + p11
        else:
            a0, a1 = f00 * x0, f10 * x0
            if ROUND:
                a0, a1 = a0.to(compute).to(tl.float32), a1.to(compute).to(tl.float32)
            y0 = tl.fma(f01, x1, a0)
            y1 = tl.fma(f11, x1, a1)
        y = tl.reshape(tl.join(y0, y1), (ROWS, 2 * HALF)).to(compute)
        tl.store(out_ptr + r[:, None] * (2 * HALF) + cols, y.to(out_ptr.dtype.element_ty), mask=row_mask)

    def gelu_tanh_forward(x_ptr, out_ptr, cols, stride_x, stride_out, BETA: tl.constexpr, KAPPA: tl.constexpr,
                          LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
        # torch's GeluTanhFunctor: 0.5·x·(1 + tanh(kBeta·(x + kKappa·x³))), x + kKappa·x³ contracted to an fma
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < cols
        x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        x_cube = x * x * x
        t = _tanh(BETA * tl.fma(KAPPA, x_cube, x), LIBDEVICE)
        y = (0.5 * x) * (1.0 + t)
        tl.store(out_ptr + row * stride_out + c, y.to(out_ptr.dtype.element_ty), mask=mask)

    def copy_rows(x_ptr, out_ptr, cols, stride_x, stride_out, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < cols
        tl.store(out_ptr + row * stride_out + c, tl.load(x_ptr + row * stride_x + c, mask=mask), mask=mask)

    def gelu_tanh_backward(grad_ptr, x_ptr, out_ptr, cols, stride_grad, stride_x, stride_out,
                           BETA: tl.constexpr, KAPPA: tl.constexpr, KAPPA3: tl.constexpr, LIBDEVICE: tl.constexpr,
                           BLOCK: tl.constexpr):
        # torch's tanh branch of GeluBackwardCUDAKernelImpl with nvcc's contractions (found on an H200 against
        # torch's kernel: fp32 at Flux's size, every fp16 and bf16 value): 1 - t² and 1 + 3·kKappa·x² as fmas,
        # and of left_derivative + right_derivative, two products, the first, 0.5·right, fused into the sum
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < cols
        dy = tl.load(grad_ptr + row * stride_grad + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        x_sq = x * x
        x_cube = x_sq * x
        t = _tanh(BETA * tl.fma(KAPPA, x_cube, x), LIBDEVICE)
        left = 0.5 * x
        tanh_derivative = tl.fma(-t, t, 1.0)
        inner_derivative = BETA * tl.fma(KAPPA3, x_sq, 1.0)
        dx = dy * tl.fma(0.5, 1.0 + t, left * tanh_derivative * inner_derivative)
        tl.store(out_ptr + row * stride_out + c, dx.to(out_ptr.dtype.element_ty), mask=mask)

    def rms_norm_forward(x_ptr, weight_ptr, y_ptr, rstd_ptr, rows, size1, size2, stride0, stride1, stride2,
                         y_stride0, y_stride1, y_stride2, eps, N: tl.constexpr, ROWS: tl.constexpr,
                         LIBDEVICE: tl.constexpr):
        # torch's vectorized_layer_norm_kernel<rms_norm> for rows of N ≤ 128: lane i of one warp holds elements
        # 4i..4i+3 and sums their squares in order (s + v·v contracted to an fma); the warp's shuffle-down tree
        # (offsets 16, 8, 4, 2, 1) adds the lanes; the mean divides by N; rstd = rsqrt(mean + eps); y = w·(rstd·x).
        # The rows: x's leading dimensions (size0, size1, size2) at their own strides, read in place; y's rows at
        # y's strides (a part of a concatenation).
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_mask = r < rows
        i0 = (r // (size1 * size2)).to(tl.int64)
        i1, i2 = ((r // size2) % size1).to(tl.int64), (r % size2).to(tl.int64)
        base = i0 * stride0 + i1 * stride1 + i2 * stride2
        y_base = i0 * y_stride0 + i1 * y_stride1 + i2 * y_stride2
        cols = tl.arange(0, 32)[:, None] * 4 + tl.arange(0, 4)[None, :]          # (lane, element of the lane)
        mask = row_mask[:, None, None] & (cols < N)[None, :, :]
        x = tl.load(x_ptr + base[:, None, None] + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        s = _lane_sums(x * x, x, x, ROWS)
        rstd = _rsqrt(_warp_tree(s, ROWS) / N + eps, LIBDEVICE)
        weight = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = weight[None, :, :] * (rstd[:, None, None] * x)
        tl.store(y_ptr + y_base[:, None, None] + cols[None, :, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + r, rstd, mask=row_mask)

    def rms_norm_backward(grad_ptr, x_ptr, weight_ptr, rstd_ptr, out_ptr, rows, size1, size2, stride0, stride1,
                          stride2, grad_stride0, grad_stride1, grad_stride2, out_stride0, out_stride1, out_stride2,
                          N: tl.constexpr, ROWS: tl.constexpr):
        # torch's layer_norm_grad_input_kernel_vectorized<rms_norm>: thread t sums dy·w·x·rstd over elements
        # 4t..4t+3 in order (the last product contracted with the sum), BlockReduceSum's warp tree adds them;
        # dx = ((N·w)·dy - (x·rstd)·sum) · (rstd / N)
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_mask = r < rows
        i0 = (r // (size1 * size2)).to(tl.int64)
        i1, i2 = ((r // size2) % size1).to(tl.int64), (r % size2).to(tl.int64)
        base = i0 * stride0 + i1 * stride1 + i2 * stride2
        grad_base = i0 * grad_stride0 + i1 * grad_stride1 + i2 * grad_stride2
        out_base = i0 * out_stride0 + i1 * out_stride1 + i2 * out_stride2
        cols = tl.arange(0, 32)[:, None] * 4 + tl.arange(0, 4)[None, :]
        mask = row_mask[:, None, None] & (cols < N)[None, :, :]
        x = tl.load(x_ptr + base[:, None, None] + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_ptr + grad_base[:, None, None] + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :, :]
        rstd = tl.load(rstd_ptr + r, mask=row_mask, other=0.0)
        rstd3 = rstd[:, None, None] + tl.zeros_like(x)
        total = _warp_tree(_lane_sums((dy * weight * x) * rstd3, dy * weight * x, rstd3, ROWS), ROWS)
        # of the two products in N·w·dy - x·rstd·sum, the first is fused into the difference (nvcc's contraction,
        # checked on an H200 against torch's kernel: fusing the second instead changes some gradients' last bits)
        dx = tl.fma(N * weight, dy, -(x * rstd[:, None, None] * total[:, None, None]))
        dx = dx * ((1.0 / N) * rstd)[:, None, None]
        tl.store(out_ptr + out_base[:, None, None] + cols[None, :, :], dx.to(out_ptr.dtype.element_ty), mask=mask)

    def copy_head_rows(x_ptr, y_ptr, rows, size1, size2, stride0, stride1, stride2, y_stride0, y_stride1,
                       y_stride2, N: tl.constexpr, ROWS: tl.constexpr):
        # rows of N elements (the heads of q, k or v) from x's strided layout to y's, as the RMSNorm kernels index
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        i0 = (r // (size1 * size2)).to(tl.int64)
        i1, i2 = ((r // size2) % size1).to(tl.int64), (r % size2).to(tl.int64)
        cols = tl.arange(0, N)
        mask = (r < rows)[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + (i0 * stride0 + i1 * stride1 + i2 * stride2)[:, None] + cols[None, :], mask=mask)
        tl.store(y_ptr + (i0 * y_stride0 + i1 * y_stride1 + i2 * y_stride2)[:, None] + cols[None, :], x, mask=mask)

    def copy_if_flagged(flag_ptr, src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        # dst = src where *flag is nonzero (NaN too); each program reads the flag and returns when it is zero
        if tl.load(flag_ptr) != 0:
            for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
                offsets = start + tl.arange(0, BLOCK)
                mask = offsets < n
                tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)

    return {"rope_rows": jit(rope_rows),
            "rms_norm_forward": jit(rms_norm_forward), "rms_norm_backward": jit(rms_norm_backward),
            "gelu_tanh_forward": jit(gelu_tanh_forward), "gelu_tanh_backward": jit(gelu_tanh_backward),
            "copy_rows": jit(copy_rows), "copy_head_rows": jit(copy_head_rows),
            "geglu_forward": jit(geglu_forward), "geglu_backward": jit(geglu_backward),
            "group_norm_partial_stats": jit(group_norm_partial_stats), "group_norm_stats": jit(group_norm_stats),
            "group_norm_apply": jit(group_norm_apply),
            "copy_if_flagged": jit(copy_if_flagged)}


def triton_available() -> bool:
    return triton is not None


def _launch(kernel: str, projection: torch.Tensor, *args):
    inner = projection.shape[-1] // 2
    block = _block(inner, _BLOCK)
    _kernels()[kernel][(projection.numel() // (2 * inner), math.ceil(inner / block))](*args, inner, BLOCK=block)


class _FusedGEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projection: torch.Tensor) -> torch.Tensor:
        inner = projection.shape[-1] // 2
        out = projection.new_empty(*projection.shape[:-1], inner)
        _launch("geglu_forward", projection, projection, out)
        ctx.save_for_backward(projection)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projection,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_projection = torch.empty_like(projection)
        _launch("geglu_backward", projection, grad, projection, grad_projection)
        return grad_projection


def takes(projection: torch.Tensor, interpret: bool = False) -> bool:
    """Whether the fused kernels run on this GEGLU projection (else ComfyUI's ops do)."""
    return (triton_available() and (projection.is_cuda or interpret and INTERPRETING)
            and projection.is_contiguous() and projection.dtype in _DTYPES and projection.shape[-1] % 2 == 0
            and projection.numel() > 0)


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


# ------------------------------------------------------------------------------------------------ GroupNorm
class _FusedGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        kernels = _kernels()
        n, channels = x.shape[:2]
        hw = x.numel() // (n * channels)
        group_size = channels // groups * hw
        block = _block(group_size, _GROUP_BLOCK)
        splits = math.ceil(group_size / block)
        part_mean = x.new_empty(n * groups, splits, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
        kernels["group_norm_partial_stats"][(n * groups, splits)](x, part_mean, part_m2, group_size, splits,
                                                                  BLOCK=block)
        # PyTorch's kernel keeps the statistics in the input's dtype; its backward reads them so
        mean, rstd = x.new_empty(n, groups), x.new_empty(n, groups)
        kernels["group_norm_stats"][(n * groups,)](part_mean, part_m2, mean, rstd, group_size, splits, eps,
                                                   BLOCK=block, SPLITS=_power_of_two(splits))
        y = torch.empty_like(x)
        kernels["group_norm_apply"][(n * groups, splits)](x, y, mean, rstd, weight, bias, group_size, hw,
                                                          channels // groups, groups, BLOCK=block)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape = (n, channels, hw, groups)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        n, channels, hw, groups = ctx.shape
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x, mean, rstd, weight, n, channels, hw, groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]])
        return grad_x, None, grad_weight, grad_bias, None


def group_norm_takes(x: torch.Tensor, groups: int, weight, bias, interpret: bool = False) -> bool:
    """Whether the fused kernels run this GroupNorm (else PyTorch's does)."""
    return (triton_available() and (x.is_cuda or interpret and INTERPRETING) and x.is_contiguous()
            and x.dim() >= 2 and x.dtype in _DTYPES and x.numel() > 0 and x.shape[1] % groups == 0
            and weight is not None and bias is not None
            and weight.dtype == bias.dtype == x.dtype and weight.device == x.device)


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float, interpret: bool = False) -> torch.Tensor:
    """`torch.nn.functional.group_norm`, fused where `group_norm_takes` says so."""
    if group_norm_takes(x, groups, weight, bias, interpret):
        return _FusedGroupNorm.apply(x, groups, weight, bias, eps)
    return F.group_norm(x, groups, weight, bias, eps)


class FusedGroupNormForward:
    """An object patch for a GroupNorm's `forward` (torch's, or comfy.ops' whose weights need no cast or
    weight function: others run their own forward)."""

    def __init__(self, module: torch.nn.GroupNorm):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        # ComfyUI sets comfy_cast_weights on a loaded layer too (partial loads), so this is checked per call
        if (getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None)
                or getattr(m, "bias_function", None)):
            return type(m).forward(m, x)
        if hasattr(m, "comfy_cast_weights"):       # comfy.ops' layers check for Cancel at every op
            import comfy.ops
            comfy.ops.run_every_op()
        return group_norm(x, m.num_groups, m.weight, m.bias, m.eps)


# ------------------------------------------------------------------------------------------- rotary embedding
def _rope_freqs(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """freqs_cis as ComfyUI's apply_rope1 uses it with x (0.33 trims it to x's third dim), broadcast over x's
    leading dims."""
    if x.shape[2] != 1 and freqs_cis.shape[2] != 1 and x.shape[2] != freqs_cis.shape[2]:
        freqs_cis = freqs_cis[:, :, :x.shape[2]]
    return freqs_cis.expand(*x.shape[:-1], *freqs_cis.shape[-3:])


def _rope_launch(x: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor, backward: bool) -> None:
    d1, d2 = x.shape[1], x.shape[2]
    rows = x.numel() // x.shape[-1]
    # backward's sum of two products must not become an fma (autograd rounds each product)
    _kernels()["rope_rows"][(math.ceil(rows / ROPE_ROWS),)](
        x, freqs, out, rows, d1, d2, *x.stride()[:3], *freqs.stride()[:3], HALF=x.shape[-1] // 2,
        ROWS=ROPE_ROWS, BACKWARD=backward, ROUND=freqs.dtype != torch.float32, enable_fp_fusion=False)


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rope_launch(x, freqs, out, backward=False)
        ctx.save_for_backward(freqs)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rope_launch(grad, freqs, grad_x, backward=True)
        return grad_x, None


def _taken_rope_freqs(x: torch.Tensor, freqs_cis: torch.Tensor, interpret: bool) -> torch.Tensor | None:
    """freqs_cis broadcast to x (_rope_freqs) where the fused kernels rotate x by it, else None."""
    if not (triton_available() and (x.is_cuda or interpret and INTERPRETING) and x.dim() == 4 and freqs_cis.dim() == 6
            and x.dtype in _DTYPES and freqs_cis.dtype in _DTYPES and freqs_cis.device == x.device
            and x.numel() > 0 and x.stride(-1) == 1 and not freqs_cis.requires_grad):
        return None
    head = x.shape[-1]
    if head < 16 or head & (head - 1) or tuple(freqs_cis.shape[-3:]) != (head // 2, 2, 2):
        return None
    if freqs_cis.stride()[-3:] != (4, 2, 1):
        return None
    try:
        return _rope_freqs(x, freqs_cis)
    except RuntimeError:            # not broadcastable: ComfyUI's own code says why
        return None


def rope_takes(x: torch.Tensor, freqs_cis: torch.Tensor, interpret: bool = False) -> bool:
    """Whether the fused kernels rotate x by freqs_cis (else ComfyUI's apply_rope1 does): a 4-D head whose last
    dim is a power of two and contiguous, rotations of shape (..., head_dim/2, 2, 2) broadcasting to it."""
    return _taken_rope_freqs(x, freqs_cis, interpret) is not None


def rope1(x: torch.Tensor, freqs_cis: torch.Tensor, interpret: bool = False) -> torch.Tensor | None:
    """x rotated by freqs_cis as ComfyUI's apply_rope1 does, by the fused kernels; None where they do not
    take the inputs (`rope_takes`)."""
    freqs = _taken_rope_freqs(x, freqs_cis, interpret)
    return None if freqs is None else _FusedRope.apply(x, freqs)


def training_rope(device: torch.device):
    """The context a training micro-batch runs in: on a GPU with Triton, ComfyUI's rotary embedding computed by
    `rope1` (ENABLED["rope"])."""
    if not (ENABLED["rope"] and usable_on(device)):
        return contextlib.nullcontext()
    from .comfy_compat import comfy_rope
    return comfy_rope(rope1)


def usable_on(device: torch.device) -> bool:
    """Whether a training run on `device` patches layers with fused kernels (ENABLED says which)."""
    return any(ENABLED.values()) and torch.device(device).type == "cuda" and triton_available()


# ----------------------------------------------------------------------------------------------- GELU (tanh)
def _gelu_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as (rows, columns) with unit column stride, a view of the same memory; None where its leading dims do
    not merge into one row stride."""
    if x.dim() < 1 or x.stride(-1) != 1 and x.shape[-1] != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _gelu_launch(kernel: str, rows: torch.Tensor, *args) -> None:
    cols = rows.shape[1]
    block = _block(cols, _GELU_BLOCK)
    _kernels()[kernel][(rows.shape[0], math.ceil(cols / block))](*args, LIBDEVICE=not INTERPRETING, BLOCK=block)


def _gelu_tanh_backward(rows: torch.Tensor, grad: torch.Tensor, grad_rows_x: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """The gradient of the GELU's input rows from its output's (grad: the input's shape, any row stride), written
    into `grad_rows_x` (rows' shape, any row stride) or a new tensor of the input's shape."""
    grad_rows = _gelu_rows(grad)
    if grad_rows is None:
        grad_rows = grad.contiguous().view(rows.shape)
    grad_x = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device) if grad_rows_x is None else grad_rows_x
    _gelu_launch("gelu_tanh_backward", rows, grad_rows, rows, grad_x, rows.shape[1], grad_rows.stride(0),
                 rows.stride(0), grad_x.stride(0), _GELU_BETA, _GELU_KAPPA, _GELU_KAPPA3)
    return grad_x.view(grad.shape) if grad_rows_x is None else grad_x


class _FusedGeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
        _gelu_launch("gelu_tanh_forward", rows, rows, out, rows.shape[1], rows.stride(0), out.stride(0),
                     _GELU_BETA, _GELU_KAPPA)
        ctx.save_for_backward(rows)     # (a view: torch's own GeluBackward keeps the same input alive)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return _gelu_tanh_backward(rows, grad), None


def _taken_gelu_rows(x: torch.Tensor, interpret: bool) -> torch.Tensor | None:
    """x's rows (_gelu_rows) where the fused kernels compute its GELU (tanh), else None."""
    if not (triton_available() and (x.is_cuda or interpret and INTERPRETING) and x.dtype in _DTYPES
            and x.numel() > 0 and not x.is_contiguous() and x.numel() < 2 ** 31):
        return None
    return _gelu_rows(x)


def gelu_tanh_takes(x: torch.Tensor, interpret: bool = False) -> bool:
    """Whether the fused kernels compute GELU (tanh) of x (else torch does): a strided slice of rows, the case
    torch's vectorized kernel leaves to its slow path (a contiguous x is torch's own fast case)."""
    return _taken_gelu_rows(x, interpret) is not None


def gelu_tanh(x: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`, by the fused kernels where `gelu_tanh_takes` says so."""
    rows = _taken_gelu_rows(x, interpret)
    return F.gelu(x, approximate="tanh") if rows is None else _FusedGeluTanh.apply(x, rows)


class _FusedGeluTanhBeside(torch.autograd.Function):
    """torch.cat((left, gelu_tanh(x)), -1) with the GELU written straight into its place (x: rows of a strided
    slice, left: contiguous, the same leading shape)."""

    @staticmethod
    def forward(ctx, left: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, gradient: "_SharedGradient | None"
                ) -> torch.Tensor:
        width = left.shape[-1]
        out = torch.empty((*x.shape[:-1], width + x.shape[-1]), dtype=x.dtype, device=x.device)
        out_rows = out.view(-1, out.shape[-1])
        left_rows = left.reshape(-1, width)
        _gelu_launch("copy_rows", left_rows, left_rows, out_rows, width, left_rows.stride(0), out_rows.stride(0))
        gelu_rows = out_rows[:, width:]
        _gelu_launch("gelu_tanh_forward", rows, rows, gelu_rows, rows.shape[1], rows.stride(0), gelu_rows.stride(0),
                     _GELU_BETA, _GELU_KAPPA)
        ctx.width, ctx.gradient = width, gradient
        ctx.save_for_backward(rows)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        if ctx.gradient is None:
            return grad[..., :ctx.width], _gelu_tanh_backward(rows, grad[..., ctx.width:]), None, None
        # x's gradient written straight into its place in the projection's (single_block_inputs)
        _gelu_tanh_backward(rows, grad[..., ctx.width:], ctx.gradient.rows()[:, ctx.gradient.split:])
        return grad[..., :ctx.width], None, None, None


def cat_gelu_tanh(left: torch.Tensor, x: torch.Tensor, gelu: torch.nn.Module,
                  gradient: "_SharedGradient | None" = None, interpret: bool = False) -> torch.Tensor:
    """`torch.cat((left, gelu(x)), -1)` for an `nn.GELU(approximate="tanh")` module `gelu` (a Flux single block's
    attention output beside its MLP's activation, the input of its second Linear): where the fused kernels take
    x, the GELU is written straight into the concatenation (the same bits, without the concatenation's copy of
    it), and with `gradient` (single_block_inputs') x's gradient straight into the projection's; else the module
    runs and torch concatenates."""
    rows = _taken_gelu_rows(x, interpret)
    if (rows is None or left.dtype != x.dtype or left.device != x.device or left.dim() != x.dim()
            or left.shape[:-1] != x.shape[:-1] or not left.is_contiguous()):
        return torch.cat((left, gelu(x)), -1)
    return _FusedGeluTanhBeside.apply(left, x, rows, gradient)


class FusedGeluTanhForward:
    """An object patch for an `nn.GELU(approximate="tanh")` module's `forward` (the module has no state: this
    looks `gelu_tanh` up at each call)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def is_gelu_tanh(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.GELU and module.approximate == "tanh"


# ------------------------------------------------------------------------------------------------------ RMSNorm
def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor) -> torch.Tensor:
    """RMSNorm of x's rows written into y (x's shape, any strides with unit last one); returns rstd."""
    sizes, strides = _rms_layout(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows = rstd.numel()
    _kernels()["rms_norm_forward"][(triton.cdiv(rows, RMS_ROWS),)](
        x, weight, y, rstd, rows, sizes[1], sizes[2], *strides, *_rms_layout(y)[1], eps, N=x.shape[-1],
        ROWS=RMS_ROWS, LIBDEVICE=not INTERPRETING)
    return rstd


def _rms_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, grad: torch.Tensor,
                  grad_x: torch.Tensor | None = None) -> torch.Tensor:
    """x's gradient from y's (grad: x's shape, any strides with unit last one), written into `grad_x` (x's shape,
    any such strides) or a new tensor."""
    sizes, strides = _rms_layout(x)
    if grad_x is None:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = rstd.numel()
    _kernels()["rms_norm_backward"][(triton.cdiv(rows, RMS_ROWS),)](
        grad, x, weight, rstd, grad_x, rows, sizes[1], sizes[2], *strides, *_rms_layout(grad)[1],
        *_rms_layout(grad_x)[1], N=x.shape[-1], ROWS=RMS_ROWS)
    return grad_x


def _copy_heads(x: torch.Tensor, y: torch.Tensor) -> None:
    """y[...] = x for two tensors of one shape (up to four dimensions, rows of a power-of-two length), any strides
    with a unit last one: the heads of q, k or v between a qkv projection's layout and attention's."""
    sizes, strides = _rms_layout(x)
    rows = x.numel() // x.shape[-1]
    _kernels()["copy_head_rows"][(triton.cdiv(rows, RMS_ROWS),)](
        x, y, rows, sizes[1], sizes[2], *strides, *_rms_layout(y)[1], N=x.shape[-1], ROWS=RMS_ROWS)


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = _rms_forward(x, weight, eps, y)
        ctx.save_for_backward(x, weight, rstd)      # (x: the strided view torch would have copied and saved)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _rms_backward(x, weight, rstd, grad), None, None


class _FusedRMSNormCat(torch.autograd.Function):
    """torch.cat((rms_norm(x0, w0, eps0), rms_norm(x1, w1, eps1)), dim): each part normalised straight into its
    place in the concatenation (backward reads each part's gradient where it lies in the concatenation's)."""

    @staticmethod
    def forward(ctx, dim: int, x0, weight0, eps0, x1, weight1, eps1) -> torch.Tensor:
        shape = list(x0.shape)
        shape[dim] += x1.shape[dim]
        y = torch.empty(shape, dtype=x0.dtype, device=x0.device)
        rstd0 = _rms_forward(x0, weight0, eps0, y.narrow(dim, 0, x0.shape[dim]))
        rstd1 = _rms_forward(x1, weight1, eps1, y.narrow(dim, x0.shape[dim], x1.shape[dim]))
        ctx.dim = dim
        ctx.save_for_backward(x0, weight0, rstd0, x1, weight1, rstd1)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x0, weight0, rstd0, x1, weight1, rstd1 = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        length = x0.shape[ctx.dim]
        grad0 = _rms_backward(x0, weight0, rstd0, grad.narrow(ctx.dim, 0, length))
        grad1 = _rms_backward(x1, weight1, rstd1, grad.narrow(ctx.dim, length, x1.shape[ctx.dim]))
        return None, grad0, None, None, grad1, None, None


def _rms_layout(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """x's leading dimensions as three (sizes, strides), padded in front."""
    pad = 4 - x.dim()
    return (1,) * pad + tuple(x.shape[:-1]), (0,) * pad + tuple(x.stride()[:-1])


def rms_norm_takes(x: torch.Tensor, weight: torch.Tensor | None, interpret: bool = False) -> bool:
    """Whether the fused kernels compute RMSNorm of x over its last dimension (else torch does): a strided x (the
    q or k of a fused qkv projection, which torch would first copy) of up to four dimensions, rows of at most 128
    elements (a multiple of 4: torch's vector width), a frozen weight on x's device."""
    return (triton_available() and (x.is_cuda or interpret and INTERPRETING) and x.dtype in _DTYPES
            and 2 <= x.dim() <= 4 and x.stride(-1) == 1 and not x.is_contiguous() and x.numel() > 0
            and x.shape[-1] <= 128 and x.shape[-1] % 4 == 0 and x.numel() < 2 ** 31
            and weight is not None and weight.shape == x.shape[-1:] and weight.device == x.device
            and not weight.requires_grad)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, interpret: bool = False) -> torch.Tensor:
    """`F.rms_norm(x, (n,), weight.to(x.dtype), eps)` (as ComfyUI casts the weight), by the fused kernels where
    `rms_norm_takes` says so: bit for bit torch's CUDA kernels, without their copy of a strided x."""
    weight = weight.to(x.dtype)
    if not rms_norm_takes(x, weight, interpret):
        return F.rms_norm(x, weight.shape, weight, eps)
    return _FusedRMSNorm.apply(x, weight.contiguous(), eps)


def rms_norm_cat(norms: tuple[torch.nn.Module, torch.nn.Module], xs: tuple[torch.Tensor, torch.Tensor], dim: int,
                 like: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """`torch.cat((norms[0](xs[0]).to(like), norms[1](xs[1]).to(like)), dim)` for two of ComfyUI's RMSNorm modules
    (a Flux double block's text and image q, or k, as its QKNorm casts them to v): where the fused kernels take
    both parts, each is normalised straight into the concatenation (the same bits, without the concatenation's
    copy), else the modules run and torch concatenates."""
    from .comfy_compat import rms_norm_parameters
    parameters = [rms_norm_parameters(norm) for norm in norms]
    x0, x1 = xs
    if (None not in parameters and x0.dtype == x1.dtype == like.dtype and x0.device == x1.device == like.device
            and x0.dim() == x1.dim()
            and 0 <= dim % x0.dim() < x0.dim() - 1
            and all(a == b for i, (a, b) in enumerate(zip(x0.shape, x1.shape)) if i != dim % x0.dim())):
        weights = [weight.to(x0.dtype) for weight, _ in parameters]
        if all(rms_norm_takes(x, weight, interpret) for x, weight in zip(xs, weights)):
            return _FusedRMSNormCat.apply(dim % x0.dim(), x0, weights[0].contiguous(), parameters[0][1], x1,
                                          weights[1].contiguous(), parameters[1][1])
    return torch.cat((norms[0](x0).to(like), norms[1](x1).to(like)), dim)


def _qkv_heads(qkv: torch.Tensor, heads: int, tokens_first: bool = False) -> torch.Tensor:
    """q, k and v of a qkv projection's output (batch, tokens, 3·heads·head_dim) as Flux's blocks view them:
    (3, batch, heads, tokens, head_dim), strided; `tokens_first`: as MMDiT's split_qkv does, (3, batch, tokens,
    heads, head_dim)."""
    if tokens_first:
        return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).movedim(2, 0)
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def _unit_last(grad: torch.Tensor) -> torch.Tensor:
    return grad if grad.stride(-1) == 1 else grad.contiguous()


def _norms_take(parts: list[torch.Tensor], parameters: list, interpret: bool) -> bool:
    """Whether the fused kernels normalise each of `parts` with its module's (weight, eps) and copy heads of their
    size (a power of two)."""
    head_dim = parts[0].shape[-1]
    return (None not in parameters and head_dim & (head_dim - 1) == 0
            and all(rms_norm_takes(part, weight.to(part.dtype), interpret)
                    for part, (weight, _) in zip(parts, parameters)))


class _JointAttentionInputs(torch.autograd.Function):
    """q and k (normalised) and v for a joint attention, text before image, from the two streams' qkv projections
    (a Flux double block's, or an MMDiT joint block's with `tokens_first`); backward writes each projection's
    gradient once, each part where it lies."""

    @staticmethod
    def forward(ctx, heads: int, tokens_first: bool, txt_qkv: torch.Tensor, img_qkv: torch.Tensor, norms: tuple):
        txt, img = _qkv_heads(txt_qkv, heads, tokens_first), _qkv_heads(img_qkv, heads, tokens_first)
        dim = 2 if tokens_first else 3         # the tokens' dimension of the parts (of the outputs: one less)
        length = txt.shape[dim]
        shape = list(txt.shape[1:])
        shape[dim - 1] += img.shape[dim]
        q, k, v = (torch.empty(shape, dtype=txt_qkv.dtype, device=txt_qkv.device) for _ in range(3))
        rstds = []
        for part, start, (q_norm, k_norm) in ((txt, 0, norms[:2]), (img, length, norms[2:])):
            n = part.shape[dim]
            rstds.append(_rms_forward(part[0], *q_norm, q.narrow(dim - 1, start, n)))
            rstds.append(_rms_forward(part[1], *k_norm, k.narrow(dim - 1, start, n)))
            _copy_heads(part[2], v.narrow(dim - 1, start, n))
        ctx.heads, ctx.tokens_first, ctx.length, ctx.norms = heads, tokens_first, length, norms
        ctx.save_for_backward(txt_qkv, img_qkv, *rstds)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        txt_qkv, img_qkv, *rstds = ctx.saved_tensors
        grad_q, grad_k, grad_v = _unit_last(grad_q), _unit_last(grad_k), _unit_last(grad_v)
        dim = 2 if ctx.tokens_first else 3
        grads = []
        for index, (qkv, start) in enumerate(((txt_qkv, 0), (img_qkv, ctx.length))):
            grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
            part = _qkv_heads(qkv, ctx.heads, ctx.tokens_first)
            grad_part = _qkv_heads(grad_qkv, ctx.heads, ctx.tokens_first)
            n = part.shape[dim]
            (q_weight, _), (k_weight, _) = ctx.norms[2 * index:2 * index + 2]
            _rms_backward(part[0], q_weight, rstds[2 * index], grad_q.narrow(dim - 1, start, n), grad_part[0])
            _rms_backward(part[1], k_weight, rstds[2 * index + 1], grad_k.narrow(dim - 1, start, n), grad_part[1])
            _copy_heads(grad_v.narrow(dim - 1, start, n), grad_part[2])
            grads.append(grad_qkv)
        return None, None, grads[0], grads[1], None


def _joint_inputs_take(txt_qkv: torch.Tensor, img_qkv: torch.Tensor, heads: int, tokens_first: bool,
                       modules: tuple, interpret: bool):
    """The norms' (weight, eps) in the projections' dtype where the fused kernels take a joint attention's inputs,
    else None."""
    from .comfy_compat import rms_norm_parameters
    if not (txt_qkv.dim() == img_qkv.dim() == 3 and txt_qkv.is_contiguous() and img_qkv.is_contiguous()
            and txt_qkv.shape[-1] == img_qkv.shape[-1] and txt_qkv.shape[-1] % (3 * heads) == 0):
        return None
    txt, img = _qkv_heads(txt_qkv, heads, tokens_first), _qkv_heads(img_qkv, heads, tokens_first)
    dim = 2 if tokens_first else 3
    parameters = [rms_norm_parameters(module) for module in modules]
    same = all(a == b for i, (a, b) in enumerate(zip(txt.shape, img.shape)) if i != dim)
    if (txt_qkv.dtype == img_qkv.dtype and txt_qkv.device == img_qkv.device and same
            and _norms_take([txt[0], txt[1], img[0], img[1]], parameters, interpret)):
        return tuple((weight.to(txt_qkv.dtype).contiguous(), eps) for weight, eps in parameters)
    return None


def joint_attention_inputs(txt_qkv: torch.Tensor, img_qkv: torch.Tensor, heads: int, txt_norm: torch.nn.Module,
                           img_norm: torch.nn.Module, interpret: bool = False):
    """(q, k, v) of a Flux double block as ComfyUI computes them from its text and image qkv projections: each
    viewed as heads, q and k normalised by the stream's QKNorm (and cast to v's dtype), text and image
    concatenated by torch.cat. Where the fused kernels take them, each part is written straight into its place
    in the concatenations, and backward writes each projection's gradient in one piece (autograd stacks the
    three parts' gradients and copies the stack into the projection's layout): the same bits, fewer copies."""
    modules = (txt_norm.query_norm, txt_norm.key_norm, img_norm.query_norm, img_norm.key_norm)
    norms = _joint_inputs_take(txt_qkv, img_qkv, heads, False, modules, interpret)
    if norms is not None:
        return _JointAttentionInputs.apply(heads, False, txt_qkv, img_qkv, norms)
    txt, img = _qkv_heads(txt_qkv, heads), _qkv_heads(img_qkv, heads)
    q = rms_norm_cat((txt_norm.query_norm, img_norm.query_norm), (txt[0], img[0]), 2, like=img[2],
                     interpret=interpret)
    k = rms_norm_cat((txt_norm.key_norm, img_norm.key_norm), (txt[1], img[1]), 2, like=img[2], interpret=interpret)
    return q, k, torch.cat((txt[2], img[2]), dim=2)


def mmdit_joint_attention_inputs(txt_qkv: torch.Tensor, img_qkv: torch.Tensor, txt_attn: torch.nn.Module,
                                 img_attn: torch.nn.Module, interpret: bool = False):
    """(q, k, v) of an MMDiT joint block (SD 3.5) as ComfyUI computes them from its context and x qkv
    projections: `SelfAttention.pre_attention` after its Linear (split_qkv, ln_q and ln_k, q and k reshaped to
    (batch, tokens, heads·head_dim)) for each, then `_block_mixing`'s torch.cat of context before x. Where the
    fused kernels take them (RMS QK norms), written in place and each projection's gradient in one piece, as
    joint_attention_inputs."""
    heads, head_dim = img_attn.num_heads, img_attn.head_dim
    modules = (txt_attn.ln_q, txt_attn.ln_k, img_attn.ln_q, img_attn.ln_k)
    norms = (_joint_inputs_take(txt_qkv, img_qkv, heads, True, modules, interpret)
             if txt_attn.num_heads == heads and txt_attn.head_dim == head_dim else None)
    if norms is not None:
        q, k, v = _JointAttentionInputs.apply(heads, True, txt_qkv, img_qkv, norms)
        return q.view(q.shape[0], q.shape[1], -1), k.view(k.shape[0], k.shape[1], -1), v
    import sys
    split_qkv = sys.modules[type(img_attn).__module__].split_qkv     # ComfyUI's own (mmdit.py)
    parts = []
    for qkv, attn in ((txt_qkv, txt_attn), (img_qkv, img_attn)):
        q, k, v = split_qkv(qkv, attn.head_dim)
        q = attn.ln_q(q).reshape(q.shape[0], q.shape[1], -1)
        k = attn.ln_k(k).reshape(q.shape[0], q.shape[1], -1)
        parts.append((q, k, v))
    return tuple(torch.cat((parts[0][t], parts[1][t]), dim=1) for t in range(3))


class _SharedGradient:
    """The gradient of a single block's projection (batch, tokens, width), written by two autograd Functions:
    cat_gelu_tanh's backward its MLP part (columns from `split` on), which runs first, then
    _SingleBlockInputs' backward q, k and v, which returns it."""

    def __init__(self, projection: torch.Tensor, split: int):
        self.shape, self.dtype, self.device, self.split = projection.shape, projection.dtype, projection.device, split
        self.tensor = None

    def rows(self) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.tensor.view(-1, self.shape[-1])

    def take(self) -> torch.Tensor | None:
        tensor, self.tensor = self.tensor, None
        return tensor


class _SingleBlockInputs(torch.autograd.Function):
    """A Flux single block's q and k (normalised), v and MLP input (views) from its first Linear's output."""

    @staticmethod
    def forward(ctx, heads: int, split: int, projection: torch.Tensor, norms: tuple, gradient: _SharedGradient):
        ctx.set_materialize_grads(False)
        part = _qkv_heads(projection[..., :split], heads)
        q, k = (torch.empty(part.shape[1:], dtype=projection.dtype, device=projection.device) for _ in range(2))
        rstd_q = _rms_forward(part[0], *norms[0], q)
        rstd_k = _rms_forward(part[1], *norms[1], k)
        ctx.heads, ctx.split, ctx.norms, ctx.gradient = heads, split, norms, gradient
        ctx.save_for_backward(projection, rstd_q, rstd_k)
        return q, k, part[2], projection[..., split:]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v, grad_mlp):
        projection, rstd_q, rstd_k = ctx.saved_tensors
        split = ctx.split
        grad = ctx.gradient.take()        # with the MLP's part written, where cat_gelu_tanh's backward ran
        if grad is None:
            grad = torch.empty(projection.shape, dtype=projection.dtype, device=projection.device)
            if grad_mlp is None:
                grad[..., split:].zero_()
            else:
                grad[..., split:].copy_(grad_mlp)
        elif grad_mlp is not None:
            grad[..., split:] += grad_mlp
        part, grad_part = _qkv_heads(projection[..., :split], ctx.heads), _qkv_heads(grad[..., :split], ctx.heads)
        for index, (grad_x, rstd) in enumerate(((grad_q, rstd_q), (grad_k, rstd_k))):
            if grad_x is None:
                grad_part[index].zero_()
            else:
                _rms_backward(part[index], ctx.norms[index][0], rstd, _unit_last(grad_x), grad_part[index])
        if grad_v is None:
            grad_part[2].zero_()
        else:
            _copy_heads(_unit_last(grad_v), grad_part[2])
        return None, None, grad, None, None


def single_block_inputs(projection: torch.Tensor, split: int, heads: int, norm: torch.nn.Module,
                        interpret: bool = False):
    """(q, k, v, mlp, gradient) of a Flux single block as ComfyUI computes them from its first Linear's output:
    torch.split at `split`, the first part viewed as heads, q and k normalised by its QKNorm (cast to v's dtype).
    Where the fused kernels take them, backward writes the projection's gradient in one piece (autograd stacks
    q's, k's and v's gradients, copies the stack into the projection's layout and concatenates it with the MLP's):
    pass `gradient` to cat_gelu_tanh, whose backward writes the MLP's part straight into it (None: the fused
    kernels do not take them)."""
    from .comfy_compat import rms_norm_parameters
    part = _qkv_heads(projection[..., :split], heads)
    parameters = [rms_norm_parameters(norm.query_norm), rms_norm_parameters(norm.key_norm)]
    if _norms_take([part[0], part[1]], parameters, interpret):
        norms = tuple((weight.to(projection.dtype).contiguous(), eps) for weight, eps in parameters)
        gradient = _SharedGradient(projection, split)
        return (*_SingleBlockInputs.apply(heads, split, projection, norms, gradient), gradient)
    qkv, mlp = torch.split(projection, [split, projection.shape[-1] - split], dim=-1)
    q, k, v = _qkv_heads(qkv, heads)
    q, k = norm(q, k, v)
    return q, k, v, mlp, None


class FusedRMSNormForward:
    """An object patch for one of ComfyUI's RMSNorm modules' `forward` (comfy_compat.rms_norm_parameters reads
    its weight and eps): the fused kernels for strided inputs, the module's own forward otherwise."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .comfy_compat import rms_norm_parameters
        module = self.module
        parameters = rms_norm_parameters(module)
        if parameters is not None and rms_norm_takes(x, parameters[0].to(x.dtype)):
            return rms_norm(x, *parameters)
        return type(module).forward(module, x)


def qk_norm_forwards(diffusion_model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, FusedRMSNormForward]:
    """Module path -> FusedRMSNormForward for the RMSNorm modules named `names` (the last part of their path):
    the q and k norms of attention layers whose q and k are strided views of one qkv projection."""
    from .comfy_compat import rms_norm_parameters
    if not ENABLED["rms_norm"]:
        return {}
    return {path: FusedRMSNormForward(module) for path, module in diffusion_model.named_modules()
            if path.rpartition(".")[2] in names and rms_norm_parameters(module) is not None}


# ----------------------------------------------------------------------------- copy where a device flag is set
_FLAG_COPY_BLOCK = 4096     # 4-byte words per program and pass


def flag_copy_takes(tensor: torch.Tensor, interpret: bool = False) -> bool:
    """Whether copy_if_flagged runs its kernel on `tensor` (else a torch.where reads and writes it all)."""
    return (ENABLED["flag_copy"] and triton_available() and (tensor.is_cuda or interpret and INTERPRETING)
            and tensor.is_contiguous())


def _words(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors' bytes as flat views of 4-byte words where they all divide into them, else of bytes."""
    flats = [t.reshape(-1).view(torch.uint8) for t in tensors]
    if all(f.numel() % 4 == 0 and f.data_ptr() % 4 == 0 for f in flats):
        return [f.view(torch.int32) for f in flats]
    return flats


def copy_if_flagged(flag: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, interpret: bool = False) -> None:
    """dst.copy_(src), bit for bit, where the one-element tensor `flag` (on their device) is nonzero, and nothing
    where it is zero, without the host reading the flag. src and dst: the same shape and dtype."""
    if not (flag_copy_takes(dst, interpret) and src.is_contiguous()):
        torch.where(flag != 0, src, dst, out=dst)
        return
    src_words, dst_words = _words(src, dst)
    n = dst_words.numel()
    if n == 0:
        return
    programs = math.ceil(n / _FLAG_COPY_BLOCK)
    if dst.is_cuda:         # enough programs to fill the GPU, each looping over its share when the flag is set
        programs = min(programs, 4 * torch.cuda.get_device_properties(dst.device).multi_processor_count)
    _kernels()["copy_if_flagged"][(programs,)](flag, src_words, dst_words, n, BLOCK=_FLAG_COPY_BLOCK)
