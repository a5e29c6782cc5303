"""Where an FP8 Linear call's time goes, one Flux / SD 3.5 Large sized layer at a time (issue 24).

For each shape (rows = tokens at 1024², in, out) times, on the GPU, with CUDA events (median of 20 after 5 warm-up):
the bf16 forward GEMM and input-gradient GEMM; `_scaled_mm` alone (per-tensor and row-wise scales, operands already
in FP8); each quantization step in torch's kernels (activations, weight row-major, weight written transposed,
weight quantized row-major then transposed by a copy, output gradient in e5m2) and in trainers/fp8.py's Triton
kernels; and the whole Fp8Gemm.forward / input_grad (Triton's quantization where it runs). Prints a table and writes fp8_gemm_bench.json to --out.

    python3 bench/fp8_gemm_bench.py --out "$OUT"      # on the GPU machine, after bench/device_setup.sh
"""
from __future__ import annotations

import argparse, importlib.util, json, os, statistics, sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# (label, rows, in, out): Flux's double-block image stream (qkv, proj, mlp up/down) and single block (linear1,
# linear2) at 4096 + 512 tokens; SD 3.5 Large's joint block (qkv, mlp) at 4096 image tokens
SHAPES = [("flux qkv", 4096, 3072, 9216), ("flux mlp up", 4096, 3072, 12288), ("flux mlp down", 4096, 12288, 3072),
          ("flux single linear1", 4608, 3072, 21504), ("flux single linear2", 4608, 15360, 3072),
          ("sd35l qkv", 4096, 2432, 7296), ("sd35l mlp up", 4096, 2432, 9728), ("sd35l mlp down", 4096, 9728, 2432)]


def import_fp8():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    spec = importlib.util.spec_from_file_location("eridiffusion", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["eridiffusion"] = module
    spec.loader.exec_module(module)
    from eridiffusion.trainers import fp8
    return fp8


def timed(fn, reps=20, warmup=5) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


SWEEP = ("flux mlp up", "flux single linear2")


def sweep(fp8, x, w, rows_mult, tensor_mult) -> dict:
    """Microseconds of the Triton quantizations under other launch shapes (fp8.CAST_TILE etc.)."""
    out = {}
    defaults = fp8.CAST_TILE, fp8.CAST_TILE_TRANSPOSED, fp8.ROW_WARPS, fp8.ROW_SINGLE_PASS
    for tile in [(64, 64, 4), (32, 256, 8), (16, 512, 8), (64, 128, 8), (32, 128, 4)]:
        fp8.CAST_TILE = tile
        out[f"cast rows {tile}"] = 1e3 * timed(lambda: fp8.scaled_cast(w, rows_mult, fp8.E4M3))
        out[f"quant tensor {tile}"] = 1e3 * timed(lambda: fp8.quantize_tensor(x, fp8.E4M3))
    for tile in [(64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 128, 8), (32, 32, 4)]:
        fp8.CAST_TILE_TRANSPOSED = tile
        out[f"cast transposed {tile}"] = 1e3 * timed(lambda: fp8.scaled_cast(w, tensor_mult, fp8.E4M3, True))
    for warps in (4, 8, 16):
        for single in (16384, 1024):
            fp8.ROW_WARPS, fp8.ROW_SINGLE_PASS = warps, single
            out[f"rows warps {warps} single<= {single}"] = 1e3 * timed(lambda: fp8.quantize_rows(x, fp8.E4M3))
    fp8.CAST_TILE, fp8.CAST_TILE_TRANSPOSED, fp8.ROW_WARPS, fp8.ROW_SINGLE_PASS = defaults
    for name, us in out.items():
        print(f"  sweep {name:40s} {us:9.1f} us", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp")
    args = parser.parse_args()
    fp8 = import_fp8()
    dev = torch.device("cuda")
    rowwise, bias_in_gemm = fp8._capabilities(dev)
    records = []
    for label, rows, n_in, n_out in SHAPES:
        torch.manual_seed(0)
        layer = torch.nn.Linear(n_in, n_out, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(rows, n_in, device=dev, dtype=torch.bfloat16)
        g = torch.randn(rows, n_out, device=dev, dtype=torch.bfloat16) * 1e-3
        w = layer.weight
        gemm = fp8.Fp8Gemm(layer, rowwise, bias_in_gemm)
        gemm._weight_scales(w)
        rows_mult, rows_dequant, tensor_mult, tensor_dequant = gemm._weight_scales(w)
        w_q = fp8._quantized(w, tensor_mult, fp8.E4M3)
        w_qt = fp8._quantized(w, tensor_mult, fp8.E4M3, transposed=True)
        x_q = fp8._quantized(x, fp8._power_of_two_scale(fp8._amax(x), fp8.E4M3)[0], fp8.E4M3)
        xr_mult, xr_deq = fp8._power_of_two_scale(fp8._amax_rows(x), fp8.E4M3)
        xr_q = fp8._quantized(x, xr_mult, fp8.E4M3)
        w_qr = fp8._quantized(w, rows_mult, fp8.E4M3)
        g_mult, g_deq = fp8._power_of_two_scale(fp8._amax(g), fp8.E5M2)
        g_q = fp8._quantized(g, g_mult, fp8.E5M2)
        one = torch.ones((), device=dev)
        flop = 2 * rows * n_in * n_out
        r = {"label": label, "rows": rows, "in": n_in, "out": n_out, "rowwise": rowwise, "ms": {
            "bf16 forward": timed(lambda: torch.nn.functional.linear(x, w, layer.bias)),
            "bf16 input grad": timed(lambda: g @ w),
            "scaled_mm tensorwise": timed(lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one,
                                                                   out_dtype=torch.bfloat16)),
            "scaled_mm rowwise": timed(lambda: torch._scaled_mm(xr_q, w_qr.t(), scale_a=xr_deq,
                                                                scale_b=rows_dequant, out_dtype=torch.bfloat16)),
            "scaled_mm backward e5m2": timed(lambda: torch._scaled_mm(g_q, w_qt, scale_a=one, scale_b=one,
                                                                      out_dtype=torch.bfloat16)),
            "quant x rowwise (amax+scale+cast)": timed(lambda: fp8._quantized(
                x, fp8._power_of_two_scale(fp8._amax_rows(x), fp8.E4M3)[0], fp8.E4M3)),
            "quant x tensorwise": timed(lambda: fp8._quantized(
                x, fp8._power_of_two_scale(fp8._amax(x), fp8.E4M3)[0], fp8.E4M3)),
            "quant w row-major (cast only)": timed(lambda: fp8._quantized(w, rows_mult, fp8.E4M3)),
            "quant w transposed write": timed(lambda: fp8._quantized(w, tensor_mult, fp8.E4M3, transposed=True)),
            "quant w row-major then .t().contiguous()": timed(
                lambda: fp8._quantized(w, tensor_mult, fp8.E4M3).t().contiguous()),
            "fp8 weight .t().contiguous()": timed(lambda: w_q.t().contiguous()),
            "quant grad e5m2": timed(lambda: fp8._quantized(
                g, fp8._power_of_two_scale(fp8._amax(g), fp8.E5M2)[0], fp8.E5M2)),
            "triton quant x rowwise": timed(lambda: fp8.quantize_rows(x, fp8.E4M3)),
            "triton quant x tensorwise": timed(lambda: fp8.quantize_tensor(x, fp8.E4M3)),
            "triton quant grad e5m2": timed(lambda: fp8.quantize_tensor(g, fp8.E5M2)),
            "triton cast w rows": timed(lambda: fp8.scaled_cast(w, rows_mult, fp8.E4M3)),
            "triton cast w transposed": timed(lambda: fp8.scaled_cast(w, tensor_mult, fp8.E4M3, transposed=True)),
            "triton fp8 weight transposed copy": timed(lambda: fp8.scaled_cast(w_q, one.reshape(1, 1), fp8.E4M3,
                                                                               transposed=True)),
            "Fp8Gemm.forward": timed(lambda: gemm.forward(x, w, layer.bias, torch.bfloat16)),
            "Fp8Gemm.input_grad": timed(lambda: gemm.input_grad(g, w, torch.bfloat16)),
        }}
        r["bf16 TFLOP/s"] = flop / r["ms"]["bf16 forward"] / 1e9
        r["fp8 tensorwise TFLOP/s"] = flop / r["ms"]["scaled_mm tensorwise"] / 1e9
        r["fp8 rowwise TFLOP/s"] = flop / r["ms"]["scaled_mm rowwise"] / 1e9
        if label in SWEEP:
            r["sweep_us"] = sweep(fp8, x, w, rows_mult, tensor_mult)
        records.append(r)
        print(f"\n{label}: rows {rows}, {n_in} -> {n_out} ({flop / 1e9:.0f} GFLOP)  bf16 {r['bf16 TFLOP/s']:.0f}, "
              f"fp8 tensorwise {r['fp8 tensorwise TFLOP/s']:.0f}, rowwise {r['fp8 rowwise TFLOP/s']:.0f} TFLOP/s",
              flush=True)
        for name, ms in r["ms"].items():
            print(f"  {name:45s} {ms * 1e3:9.1f} us", flush=True)
        del layer, x, g, w, w_q, w_qt, x_q, xr_q, w_qr, g_q
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_gemm_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}, f,
                  indent=1)


if __name__ == "__main__":
    main()
