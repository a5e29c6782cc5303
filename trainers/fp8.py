"""FP8 compute for the frozen base Linear layers of the DiT blocks (Training settings' `fp8_compute`).

Hopper's (and Ada's) FP8 tensor cores multiply at twice the bf16 rate. With `fp8_compute` on, the base GEMMs of
the Linear layers inside the model's transformer blocks run as `torch._scaled_mm` in FP8 — the forward GEMM and
the input-gradient GEMM of backward; a frozen base never needs its weight gradient — while the adapters
(LoRA's down/up, LoKr, LoHa, DoRA's magnitude) compute in the activations' dtype as before, and so do the
layers outside the blocks (embedders, final layer: small and the most sensitive to precision).

Why our own autograd.Function and not torchao's Float8Linear: that swaps modules and trains their weight; here
the weight is frozen (no weight-gradient GEMM at all) and must enter through ModelPatcher object patches, never
by changing the MODEL's modules, which ComfyUI shares with other prompts and clones.

Numerics (all scales are tensors on the device: no host sync, CUDA graphs capture it):
- activations: e4m3 (3 mantissa bits) with a dynamic scale per row where the device's `_scaled_mm` takes
  row-wise scales (sm90: probed once per device), else one per tensor;
- weights: e4m3 with a scale per output row (row-wise forward) and one per tensor (backward, where the rows are
  the contraction dimension and cannot keep scales of their own); both are computed once per layer from the
  frozen weight and cached (N + 1 floats per layer). A weight already stored in e4m3 with one scale per tensor
  (ComfyUI's weight_dtype fp8_e4m3fn; 0.3.75's scaled fp8 with its `scale_weight`; ComfyUI's quantized layers of
  a per-tensor e4m3 layout, comfy_compat.fp8_tensorwise) is used as it is, never quantized again;
- output gradients: e5m2 (2 mantissa bits, 5 exponent bits: gradients span far more binades than activations),
  one dynamic scale per tensor;
- every scale is a power of two (2^k with the largest k that keeps amax·2^k within the format's maximum), so
  scaling itself is exact and the only rounding is the cast to FP8; the GEMMs accumulate in fp32 and write the
  activations' dtype.

Memory: no persistent FP8 copy of any weight (peak memory stays that of bf16). Each call quantizes the weight
on the fly into a temporary: forward reads the bf16 weight (2 bytes per element) and writes e4m3 (1 byte);
backward writes the transposed e4m3 copy `_scaled_mm` needs for its column-major second operand in the same
pass (2 + 1 bytes). That is ~3 extra bytes of traffic per weight element per GEMM, against the GEMM's own 2 of
bf16: worth it only where the GEMM is compute-bound, hence MIN_ROWS. Nothing else is saved for backward (the
weight is the layer's own parameter). Every quantization is one or two Triton kernels on the GPU (below: torch's
own took as long as the FP8 GEMM they fed), torch's ops elsewhere, with the same bits.

Which layers qualify (the others run their own forward in the activations' dtype, unchanged):
- torch/comfy.ops Linear layers inside `Architecture.block_modules` (gradient checkpointing's blocks);
- in_features and out_features multiples of 16 (`_scaled_mm`'s rule for both GEMMs);
- weight on the activations' device, in fp32/bf16/fp16 or e4m3 (e5m2-stored weights and ComfyUI's other
  quantized layers — nvfp4, int8, block-scaled fp8, AWQ-smoothed — keep the path they have without fp8_compute);
- no weight or bias function (stacked LoRAs of the stock loader, lowvram patches);
- memory_budget_gb: a layer whose weight is in CPU memory when it runs (ComfyUI casts it per use) keeps its own
  forward in bf16; a weight on the device when its layer runs (resident, or a streamed one staged ahead of its
  block) is quantized like any other: FP8 over the copy;
- at least MIN_ROWS rows (tokens × batch) per call: the modulation Linears (one row per sample) and short text
  streams are weight-bandwidth-bound, where quantizing the weight costs more than the faster GEMM saves. A weight
  stored in e4m3 is not quantized, so it takes FP8 at any row count (MIN_ROWS_STORED).
Checked at every call (shapes and dtypes are host facts: nothing is synced), so a CUDA graph captures the
decision made for its shapes.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from .blocks import kept_linear_outputs
from .comfy_compat import dequantized_linear, fp8_tensorwise, has_quantized_weight, is_linear
from .config import ConfigError
from .fused import INTERPRETING, _block, tl, triton, triton_available  # noqa: F401 (tl: the kernels' global)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# the formats' largest finite values are 0.875·2^E (448 = 0.875·2^9, 57344 = 0.875·2^16)
_MAX_EXPONENT = {E4M3: 9, E5M2: 16}
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# GEMMs with fewer rows than this stay in the activations' dtype (see the module's docstring): on an H200 the
# weight's quantization (~3 bytes per element at 4.8 TB/s) costs what the faster GEMM saves (half of 2·rows
# flops per element at ~0.8 PFLOP/s) at ~600 rows. ERI_FP8_MIN_ROWS in ComfyUI's environment sets it (the bench's
# A/B runs); the CPU tests lower it, their tiny models having 16 tokens.
MIN_ROWS = int(os.environ.get("ERI_FP8_MIN_ROWS", "1024"))
# A weight already stored in e4m3 has nothing to quantize: its FP8 GEMM reads 1 byte per element at any row count,
# where the layer's own forward casts it to bf16 (1 byte read, 2 written) and reads that again — so it takes FP8
# from one row up (the modulation Linears, the text stream). ERI_FP8_STORED_MIN_ROWS sets it (the bench's A/B).
MIN_ROWS_STORED = int(os.environ.get("ERI_FP8_STORED_MIN_ROWS", "1"))
# devices whose FP8 tensor cores `_scaled_mm` uses: compute capability 8.9 (Ada) and up
MIN_CAPABILITY = (8, 9)


def check_device(device) -> None:
    """A ConfigError naming fp8_compute where this device cannot run FP8 GEMMs. The CPU passes: torch runs
    `_scaled_mm` there (slowly), which the tests use."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda" or torch.version.hip:     # (ROCm's MI300 computes in other FP8 formats)
        raise ConfigError(f"fp8_compute needs an NVIDIA GPU with FP8 tensor cores (Ada or Hopper: sm89/sm90 and "
                          f"later); the training device is {device.type}: turn fp8_compute off")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"fp8_compute needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or "
                          f"higher: Ada, Hopper, Blackwell); {name} is {capability[0]}.{capability[1]}: turn "
                          f"fp8_compute off")


def _capabilities(device: torch.device) -> tuple[bool, bool]:
    """(row-wise scales, bias inside the GEMM) as this device's `_scaled_mm` takes them. ERI_FP8_ROWWISE=0 in
    ComfyUI's environment takes per-tensor scales everywhere, read as each training run starts (the bench's A/B
    runs: row-wise scales are the more precise, per-tensor GEMMs may be the faster)."""
    rowwise = os.environ.get("ERI_FP8_ROWWISE", "1") != "0"
    return _takes(device, rowwise) if rowwise else (False, _takes(device, False)[1])


@functools.cache
def _takes(device: torch.device, rowwise: bool) -> tuple[bool, bool]:
    """(row-wise scales, bias inside the GEMM): whether `_scaled_mm` on `device` runs a tiny product with them,
    tried once per device (the CPU runs every combination)."""
    if device.type == "cpu":
        return rowwise, True

    def runs(rowwise: bool, bias: bool) -> bool:
        a = torch.ones(16, 16, device=device).to(E4M3)
        b = torch.ones(16, 16, device=device).to(E4M3).t()
        sa = torch.ones(16, 1, device=device) if rowwise else torch.ones((), device=device)
        sb = torch.ones(1, 16, device=device) if rowwise else torch.ones((), device=device)
        try:
            torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                             bias=torch.zeros(16, device=device, dtype=torch.bfloat16) if bias else None)
            return True
        except (RuntimeError, NotImplementedError):
            return False

    rowwise = rowwise and runs(True, False)
    return rowwise, runs(rowwise, True)


def _power_of_two_scale(amax: torch.Tensor, fmt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^k, 2^-k) in fp32 for the largest k with amax·2^k ≤ the format's maximum (0.875·2^E): with
    amax = m·2^e, m in [0.5, 1), k = E - e where m ≤ 0.875, else E - 1 - e. Exact, no log rounding."""
    mantissa, exponent = torch.frexp(amax.float())
    top = _MAX_EXPONENT[fmt]
    k = (torch.where(mantissa <= 0.875, top, top - 1) - exponent).clamp(-120, 120).float()
    return torch.exp2(k), torch.exp2(-k)


def _amax_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)


def _amax(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, float("inf")).reshape(1, 1)


def _quantized(x: torch.Tensor, multiplier: torch.Tensor, fmt: torch.dtype, transposed: bool = False):
    """x · multiplier cast to `fmt` in torch's kernels (the product in fp32: `multiplier` is an fp32 tensor of ≥ 1
    dimension, so it is not demoted to x's dtype). `transposed`: written column-major, as `_scaled_mm` takes its
    second operand (the result is x's shape with strides (1, rows)). Where torch cannot write FP8 from a product
    (checked once per device), the product and the cast are two kernels."""
    if transposed:
        out = torch.empty(x.shape[1], x.shape[0], dtype=fmt, device=x.device).t()
    else:
        out = torch.empty(x.shape, dtype=fmt, device=x.device)
    if _writes_fp8(x.device.type):
        return torch.mul(x, multiplier, out=out)
    return out.copy_(x * multiplier)


@functools.cache
def _writes_fp8(device: str) -> bool:
    """Whether torch writes a product into an FP8 tensor on this kind of device (a property of the build)."""
    try:
        torch.mul(torch.ones(2, 2, device=device, dtype=torch.bfloat16), torch.ones(1, 1, device=device),
                  out=torch.empty(2, 2, device=device, dtype=E4M3).t())
        return True
    except (RuntimeError, NotImplementedError):
        return False


# Quantization in Triton. Measured on an H200 (bench/fp8_gemm_bench.py): torch's kernels above took 160-650 µs to
# quantize one Flux-sized operand (amax, six scalar ops, a product written to FP8 on torch's non-vectorized path,
# a transposed write), as long as the FP8 GEMM it feeds; each of these reads its input once (rows: once from
# memory and once from L2), writes FP8, and computes the power-of-two scale in registers, bit for bit as
# _power_of_two_scale does. Torch's path runs where Triton does not (CPU, no Triton); the CPU tests run these in
# Triton's interpreter (KERNELS_ON_CPU) against it.
KERNELS_ON_CPU = False
# launch shapes, set from bench/fp8_gemm_bench.py's sweep on an H200: (rows, columns, warps) of a cast's tile,
# row-major and transposed; a row kernel's widest single pass and its warps
CAST_TILE = (32, 256, 8)
CAST_TILE_TRANSPOSED = (64, 64, 4)
ROW_SINGLE_PASS = 16384      # rows up to this many elements are read once, held in registers
ROW_WARPS = 8
_ROW_BLOCK = 4096            # longer rows: two passes of this many elements (the second from L2)
_AMAX_BLOCK = 4096
_AMAX_PROGRAMS = 1024        # partial maxima (the cast reduces them: no atomics, no zeroed buffer)


if triton is not None:    # (module level: the kernels find each other and `tl` among their globals)

    @triton.jit
    def _power_of_two_exponent(amax, MAX_EXPONENT: tl.constexpr):
        # _power_of_two_scale's k from amax's bits: amax = m·2^e (m in [1, 2)) is frexp's (m/2)·2^(e+1), and
        # m/2 ≤ 0.875 where the 23 fraction bits are ≤ 0.75·2^23; frexp(0) = (0, 0)
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        k = tl.where((bits & 0x7FFFFF) <= 6291456, MAX_EXPONENT - 1 - e, MAX_EXPONENT - 2 - e)
        k = tl.where(amax == 0.0, MAX_EXPONENT, k)
        return tl.minimum(tl.maximum(k, -120), 120)

    @triton.jit
    def _power_of_two(k):
        return ((k + 127) << 23).to(tl.float32, bitcast=True)     # 2^k, exact for |k| ≤ 126

    @triton.jit
    def _quantize_rows_kernel(x_ptr, out_ptr, dequant_ptr, n, stride_x, stride_out, MAX_EXPONENT: tl.constexpr,
                              BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if SINGLE_PASS:      # the whole row in one block, read once
            cols = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
            k = _power_of_two_exponent(tl.max(tl.abs(x), axis=0), MAX_EXPONENT)
            q = (x * _power_of_two(k)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + row * stride_out + cols, q, mask=cols < n)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            k = _power_of_two_exponent(tl.max(amax, axis=0), MAX_EXPONENT)
            multiplier = _power_of_two(k)
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
                q = (x * multiplier).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + row * stride_out + cols, q, mask=cols < n)
        tl.store(dequant_ptr + row, _power_of_two(-k))

    @triton.jit
    def _amax_partial_kernel(x_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(program * BLOCK, numel, tl.num_programs(0) * BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)))
        tl.store(partial_ptr + program, tl.max(amax, axis=0))

    @triton.jit
    def _cast_kernel(x_ptr, out_ptr, scale_ptr, dequant_ptr, rows, cols, partials, stride_x, stride_out_row,
                     stride_out_col, MODE: tl.constexpr, MAX_EXPONENT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr, PARTIALS: tl.constexpr):
        # MODE 0: a multiplier per row at scale_ptr; 1: one multiplier; 2: the multiplier of the amax of the
        # `partials` partial maxima at scale_ptr, its dequantization scale written to dequant_ptr
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            multiplier = tl.load(scale_ptr + r, mask=r < rows, other=0.0)[:, None]
        elif MODE == 1:
            multiplier = tl.load(scale_ptr)
        else:
            parts = tl.arange(0, PARTIALS)
            amax = tl.max(tl.load(scale_ptr + parts, mask=parts < partials, other=0.0), axis=0)
            k = _power_of_two_exponent(amax, MAX_EXPONENT)
            multiplier = _power_of_two(k)
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(dequant_ptr, _power_of_two(-k))
        q = (x * multiplier).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None].to(tl.int64) * stride_out_row + c[None, :].to(tl.int64) * stride_out_col, q,
                 mask=mask)


def _triton_takes(x: torch.Tensor) -> bool:
    return (triton_available() and (x.is_cuda or KERNELS_ON_CPU and INTERPRETING) and x.ndim == 2
            and x.stride(1) == 1 and x.numel() < 2 ** 31)


def _cast(x: torch.Tensor, scale: torch.Tensor, fmt: torch.dtype, mode: int, transposed: bool,
          dequant: torch.Tensor | None = None, partials: int = 1) -> torch.Tensor:
    rows, cols = x.shape
    if transposed:
        out = torch.empty(cols, rows, dtype=fmt, device=x.device).t()
    else:
        out = torch.empty(rows, cols, dtype=fmt, device=x.device)
    block_rows, block_cols, warps = CAST_TILE_TRANSPOSED if transposed else CAST_TILE
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
    _cast_kernel[grid](x, out, scale, scale if dequant is None else dequant, rows, cols, partials, x.stride(0),
                       out.stride(0), out.stride(1), MODE=mode, MAX_EXPONENT=_MAX_EXPONENT[fmt],
                       BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, PARTIALS=_block(partials, _AMAX_PROGRAMS),
                       num_warps=warps)
    return out


def scaled_cast(x: torch.Tensor, multiplier: torch.Tensor, fmt: torch.dtype, transposed: bool = False):
    """x · multiplier in `fmt` (multiplier: fp32, one per row (rows, 1) or one (1, 1)); `transposed` as _quantized."""
    if not _triton_takes(x):
        return _quantized(x, multiplier, fmt, transposed)
    per_row = multiplier.numel() != 1
    return _cast(x, multiplier.reshape(-1).contiguous(), fmt, 0 if per_row else 1, transposed)


def quantize_rows(x: torch.Tensor, fmt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `fmt` with a power-of-two scale per row, the rows' dequantization scales (rows, 1) in fp32)."""
    if not _triton_takes(x):
        multiplier, dequant = _power_of_two_scale(_amax_rows(x), fmt)
        return _quantized(x, multiplier, fmt), dequant
    rows, n = x.shape
    out = torch.empty(rows, n, dtype=fmt, device=x.device)
    dequant = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    single = n <= ROW_SINGLE_PASS
    _quantize_rows_kernel[(rows,)](x, out, dequant, n, x.stride(0), out.stride(0), MAX_EXPONENT=_MAX_EXPONENT[fmt],
                                   BLOCK=_block(n, ROW_SINGLE_PASS if single else _ROW_BLOCK), SINGLE_PASS=single,
                                   num_warps=ROW_WARPS)
    return out, dequant


def quantize_tensor(x: torch.Tensor, fmt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `fmt` with one power-of-two scale, its dequantization scale (a 0-dimensional fp32 tensor))."""
    if not _triton_takes(x) or not x.is_contiguous():
        multiplier, dequant = _power_of_two_scale(_amax(x), fmt)
        return _quantized(x, multiplier, fmt), dequant.reshape(())
    programs = min(triton.cdiv(x.numel(), _AMAX_BLOCK), _AMAX_PROGRAMS)
    partial = torch.empty(programs, dtype=torch.float32, device=x.device)
    _amax_partial_kernel[(programs,)](x, partial, x.numel(), BLOCK=_AMAX_BLOCK, num_warps=8)
    dequant = torch.empty((), dtype=torch.float32, device=x.device)
    return _cast(x, partial, fmt, 2, False, dequant, programs), dequant


class Fp8Gemm:
    """The FP8 GEMMs of one frozen Linear layer, with its weight's scales cached (per device)."""

    def __init__(self, layer: torch.nn.Module, rowwise: bool, bias_in_gemm: bool):
        self.layer = layer
        self.rowwise = rowwise
        self.bias_in_gemm = bias_in_gemm
        self._scales = None    # (device, row multiplier (N,1), row dequant (1,N), tensor multiplier (1,1), dequant ())
        # a QuantizedTensor's per-tensor scale (comfy_compat.fp8_tensorwise); else 0.3.75's scaled-fp8 scale_weight
        self.stored_scale = None

    def weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weight to run x through in FP8, or None where this call stays on the layer's own forward."""
        layer = self.layer
        weight = getattr(layer, "weight", None)
        quantized = fp8_tensorwise(weight)
        if quantized is not None and getattr(layer, "pre_quant_scale", None) is None:
            weight, self.stored_scale = quantized
        if (type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.device != x.device
                or x.dtype not in _DTYPES or weight.dtype not in (*_DTYPES, E4M3)
                or getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None)
                or x.ndim < 2 or x.shape[-1] != weight.shape[1]
                or x.numel() // x.shape[-1] < (MIN_ROWS_STORED if weight.dtype == E4M3 else MIN_ROWS)):
            return None
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.device != x.device:
            return None
        return weight

    def _weight_scales(self, weight: torch.Tensor):
        if self._scales is None or self._scales[0] != weight.device:
            with torch.no_grad():
                if weight.dtype == E4M3:     # stored fp8: used as it is, times its scale
                    scale = self.stored_scale
                    if scale is None:
                        scale = getattr(self.layer, "scale_weight", None)
                    dequant = (torch.ones((), device=weight.device) if scale is None
                               else scale.detach().to(device=weight.device, dtype=torch.float32).reshape(()))
                    self._scales = (weight.device, None, dequant.expand(1, weight.shape[0]).contiguous(),
                                    torch.ones(1, 1, device=weight.device), dequant)
                else:
                    rows, rows_dequant = _power_of_two_scale(_amax_rows(weight), E4M3)
                    tensor, tensor_dequant = _power_of_two_scale(_amax(weight), E4M3)
                    self._scales = (weight.device, rows, rows_dequant.reshape(1, -1).contiguous(), tensor,
                                    tensor_dequant.reshape(()))
        return self._scales[1:]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
        """x (rows, in) · weightᵀ + bias, in FP8."""
        rows_mult, rows_dequant, tensor_mult, tensor_dequant = self._weight_scales(weight)
        stored = weight.dtype == E4M3
        if self.rowwise:
            x_q, x_dequant = quantize_rows(x, E4M3)
            w_q = weight if stored else scaled_cast(weight, rows_mult, E4M3)
            w_dequant = rows_dequant
        else:
            x_q, x_dequant = quantize_tensor(x, E4M3)
            w_q = weight if stored else scaled_cast(weight, tensor_mult, E4M3)
            w_dequant = tensor_dequant
        if bias is not None:
            bias = bias.to(out_dtype)
        # (the probe tried a bf16 bias: fp16 and fp32 outputs add theirs after the product)
        fused_bias = bias is not None and self.bias_in_gemm and out_dtype == torch.bfloat16
        out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_dequant, scale_b=w_dequant, out_dtype=out_dtype,
                               bias=bias if fused_bias else None)
        if bias is not None and not fused_bias:
            out.add_(bias)
        return out

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """grad (rows, out) · weight: grad in e5m2, the weight in e4m3 written transposed, both per tensor."""
        _, _, tensor_mult, tensor_dequant = self._weight_scales(weight)
        if weight.dtype == E4M3 and not _triton_takes(weight):     # (torch multiplies no FP8 tensors)
            w_q = weight.t().contiguous().t()
        else:       # a stored e4m3 weight's multiplier is one: its copy written transposed
            w_q = scaled_cast(weight, tensor_mult, E4M3, transposed=True)
        g_q, dequant = quantize_tensor(grad.reshape(-1, grad.shape[-1]), E5M2)
        return torch._scaled_mm(g_q, w_q, scale_a=dequant, scale_b=tensor_dequant, out_dtype=out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x Wᵀ + b in FP8 for rows x, W and b frozen: backward gives x's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias, gemm: Fp8Gemm, out_dtype):
        ctx.gemm, ctx.in_dtype = gemm, x.dtype
        # Held, not saved: the weight is frozen (no in-place update within a step), and a MODEL that sampling first
        # loaded to the GPU under inference mode has inference-tensor weights, which save_for_backward refuses
        ctx.weight = weight
        out, = kept_linear_outputs(lambda: (gemm.forward(x, weight, bias, out_dtype),))
        return out

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.weight
        grad_x = ctx.gemm.input_grad(grad, weight, ctx.in_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class Fp8Forward:
    """An object patch for a frozen Linear's `forward` (and the base forward of an adapted one: PatchedForward's
    `fp8`): FP8 where `Fp8Gemm.weight` takes the call, else the layer's own forward (`dequantize`: an adapted
    quantized layer's dequantized product, as PatchedForward runs it without fp8_compute)."""

    def __init__(self, layer: torch.nn.Module, gemm: Fp8Gemm, dequantize: bool = False):
        self.layer = layer
        self.gemm = gemm
        self.dequantize = dequantize

    def weight(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.gemm.weight(x)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        weight = None if args or kwargs else self.gemm.weight(x)
        if weight is None:
            if self.dequantize and not args and not kwargs:
                return dequantized_linear(layer, x)
            return type(layer).forward(layer, x, *args, **kwargs)
        if hasattr(layer, "comfy_cast_weights"):       # comfy.ops' layers check for Cancel at every op
            import comfy.ops
            if hasattr(comfy.ops, "run_every_op"):
                comfy.ops.run_every_op()
        out_dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                     else x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        out = _Fp8Linear.apply(rows, weight, getattr(layer, "bias", None), self.gemm, out_dtype)
        return out.view(*x.shape[:-1], out.shape[-1])


def qualifies(module: torch.nn.Module) -> bool:
    """A Linear whose shapes `_scaled_mm` takes (in and out multiples of 16); of ComfyUI's quantized layers, those
    stored in e4m3 with one scale per tensor."""
    if not is_linear(module) or has_quantized_weight(module) and fp8_tensorwise(module.weight) is None:
        return False
    shape = module.weight.shape
    return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0


def forwards(root: torch.nn.Module, blocks: list[str], device) -> dict[str, Fp8Forward]:
    """module path -> Fp8Forward for every qualifying Linear inside the blocks `blocks` of `root`."""
    check_device(device)
    rowwise, bias_in_gemm = _capabilities(torch.device(device))
    _writes_fp8(torch.device(device).type)      # (tried here, before a CUDA graph may capture a first call)
    out = {}
    for block in blocks:
        for name, module in root.get_submodule(block).named_modules():
            if name and qualifies(module):
                out[f"{block}.{name}"] = Fp8Forward(module, Fp8Gemm(module, rowwise, bias_in_gemm))
    logging.info("EriDiffusion: fp8_compute: %d Linear layers of the blocks compute in FP8 (%s scales)", len(out),
                 "row-wise" if rowwise else "per-tensor")
    return out
