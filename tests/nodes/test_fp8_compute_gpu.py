"""fp8_compute on the GPU (sm89/sm90: Ada, Hopper), bf16 models: what tests/nodes/test_fp8_compute.py checks on the
CPU, with CUDA's _scaled_mm (row-wise scales where the GPU takes them), CUDA graphs and gradient checkpointing.
Flux's images are 1024 pixels (4096 tokens: fp8.MIN_ROWS is met as on full-size models); the tiny SD3's position
table stops at 256 pixels (256 tokens), so its test lowers MIN_ROWS to 1.

Tolerances as on the CPU (see there): losses within 5 % per step of the bf16 run, one batch's adapter gradients
with cosine ≥ 0.99; graphs replay the eager FP8 steps (1e-3); peak memory no higher than bf16's (2 % slack for
the allocator's rounding). Resuming bit-exactly is the CPU test's (FP8 adds no randomness). Needs a GPU:
`ERI_TEST_DEVICE=cuda scripts/test -m gpu tests/nodes/test_fp8_compute_gpu.py`; on the CPU, and on GPUs below
compute capability 8.9, skipped."""
import logging

import pytest
import torch

from helpers import model_output, prepared, run, settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu
    or torch.cuda.get_device_capability() < (8, 9), reason="needs an sm89+ GPU (ERI_TEST_DEVICE=cuda)")]

SIDE = {"sd3": 256, "flux": 1024}
OPTIONS = dict(precision="bf16", learning_rate=1e-3, gradient_checkpointing=True)


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    from test_fp8_compute import counted_scaled_mm
    return counted_scaled_mm(monkeypatch)


@pytest.fixture(params=["flux", "sd3"])
def p(request, comfy_folders, tiny, monkeypatch):
    from eridiffusion.trainers import fp8
    if request.param == "sd3":
        monkeypatch.setattr(fp8, "MIN_ROWS", 1)
    side = SIDE[request.param]
    with torch.inference_mode(False):
        p = prepared(comfy_folders, tiny, arch=request.param, sizes=((side, side),) * 2, resolution=side,
                     min_side=64, max_side=side)
        p["model"] = tiny.tiny_model(request.param, dtype=torch.bfloat16)
    return p


def train(p, steps, adapter=None, **overrides):
    from eridiffusion.trainers.loop import train as train_steps
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(False):
        state = train_steps(p["model"], adapter or p["adapter"], p["latents"], p["captions"],
                            settings(**{**OPTIONS, **overrides}), steps)
    torch.cuda.synchronize()
    return state, torch.cuda.max_memory_allocated()


def gradients(p, adapter, **overrides):
    from eridiffusion.trainers.comfy_compat import training_mode
    from eridiffusion.trainers.loop import TrainingRun
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        run_ = TrainingRun(p["model"], adapter, p["latents"], p["captions"], settings(**{**OPTIONS, **overrides}),
                           end_step=1)
        _, grads = run_._loss_and_gradients(run_._micro_batch())
        return torch.cat([g.float().flatten() for g in grads])


@pytest.mark.parametrize("scaling", ["rowwise", "per_tensor"])
@pytest.mark.parametrize("compile_mode", ["off", "cuda_graphs"])
def test_fp8_training_follows_bf16_within_its_memory(p, scaled_mm_calls, compile_mode, scaling, monkeypatch):
    if scaling == "per_tensor":     # (row-wise where the GPU takes it, else per tensor in both runs)
        monkeypatch.setenv("ERI_FP8_ROWWISE", "0")
    wide, wide_peak = train(p, 5, compile=compile_mode)
    narrow, narrow_peak = train(p, 5, compile=compile_mode, fp8_compute=True)
    assert scaled_mm_calls["count"] > 0
    logging.info("fp8 losses %s, bf16 %s; peak %d vs %d", narrow.history.losses, wide.history.losses, narrow_peak,
                 wide_peak)
    assert narrow.history.losses == pytest.approx(wide.history.losses, rel=0.05)
    # (+ 64 MiB: cuBLASLt's workspace, should _scaled_mm take one of its own besides the bf16 GEMMs')
    assert narrow_peak <= 1.02 * wide_peak + 64 * 2**20
    on, off = gradients(p, wide, fp8_compute=True, compile="off"), gradients(p, wide, compile="off")
    assert off.norm() > 0 and torch.nn.functional.cosine_similarity(on, off, dim=0) >= 0.99


@pytest.mark.parametrize("recompute_layers", [True, False], ids=["layers_recomputed", "layers_kept"])
def test_graphed_fp8_training_replays_the_eager_steps(p, scaled_mm_calls, recompute_layers):
    eager, _ = train(p, 6, fp8_compute=True, compile="off", recompute_layers=recompute_layers)
    graphed, _ = train(p, 6, fp8_compute=True, compile="cuda_graphs", recompute_layers=recompute_layers)
    assert graphed.history.losses == pytest.approx(eager.history.losses, rel=1e-3)


def test_fp8_training_leaves_the_model_and_samples_as_the_stock_loader(p, scaled_mm_calls):
    from nodes import LoraLoaderModelOnly
    from eridiffusion.nodes.adapter import EriSaveAdapter
    clone = p["model"].clone()
    before, before_clone = model_output(p["model"], p), model_output(clone, p)
    trained, _ = train(p, 5, fp8_compute=True, learning_rate=1e-2)
    from eridiffusion.trainers.state import patched_model
    trained_model = patched_model(p["model"], trained)
    calls = scaled_mm_calls["count"]
    assert calls > 0
    assert torch.equal(model_output(p["model"], p), before) and torch.equal(model_output(clone, p), before_clone)
    name = run(EriSaveAdapter, adapter=trained, filename_prefix="eri/fp8gpu", save_dtype="fp32")[0]
    (loaded,) = LoraLoaderModelOnly().load_lora_model_only(p["model"], name, 1.0)
    expected, got = model_output(trained_model, p), model_output(loaded, p)
    assert scaled_mm_calls["count"] == calls
    assert not torch.allclose(expected, before)
    assert (got.float() - expected.float()).norm() / expected.float().norm() <= 1e-2     # bf16 sampling


@pytest.mark.parametrize("rows", [1, 40, 4096])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e4m3fn])
def test_fp8_linear_agrees_with_the_wide_product_on_the_gpu(stored, rows, scaled_mm_calls, monkeypatch):
    """The CPU test's layer through CUDA's _scaled_mm: one row (an e4m3-stored modulation Linear) to many."""
    from test_fp8_compute import test_fp8_linear_forward_and_input_gradient_agree_with_the_wide_product as check
    from eridiffusion.trainers import fp8
    monkeypatch.setattr(fp8, "MIN_ROWS", 1)
    rowwise = fp8._takes(torch.device("cuda"), True)[0]
    scaled_mm_calls["count"] = 0        # (the probe's own calls, on the first use of the device)
    check(rowwise, stored, True, rows, scaled_mm_calls, monkeypatch, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_quantization_kernels_give_torchs_result_bit_for_bit_on_the_gpu(dtype, monkeypatch):
    """The CPU test's check on the compiled kernels, with random operands: their rounding to FP8 too."""
    from test_fp8_compute import test_fp8_quantization_kernels_give_torchs_result_bit_for_bit as check
    check(dtype, monkeypatch, device="cuda", on_grid=False)
