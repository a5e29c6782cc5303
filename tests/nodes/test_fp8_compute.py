"""fp8_compute: the frozen base Linear layers of the DiT blocks run their GEMMs in FP8 (torch._scaled_mm, which
torch runs on the CPU too), the adapter in its own dtype; training only.

The tiny models' sequences are 16 tokens per image, far below fp8.MIN_ROWS (where FP8 starts paying off on a
GPU), so these tests lower it to 1: every qualifying GEMM runs in FP8. A counter around torch._scaled_mm shows
that they do.

Tolerances: e4m3 keeps 3 mantissa bits (relative rounding ≤ 2^-4 per element), e5m2 2; a GEMM of K terms with
independent roundings has a relative error of ~2^-4/√3 ≈ 4 % per operand at worst and ~2-3 % typically. The loss of
a step is a mean over all outputs of the model, so its FP8 error averages out: 5 % per step leaves margin over the
≤ 2.2 % measured on these models (most steps ≤ 1 %). The adapter's gradient on one batch keeps a cosine ≥ 0.99
with the fp32 one (measured 0.993-0.998: the brief's bar)."""
import logging

import pytest
import torch

from helpers import assert_chained_and_resumed_equal_one_run, model_output, prepared, run, settings, train

ARCHS = ["flux", "sd3", "zimage"]


def counted_scaled_mm(monkeypatch) -> dict:
    """{"count": the number of torch._scaled_mm calls so far} (the GPU tests use it too)."""
    calls = {"count": 0}
    real = torch._scaled_mm

    def counted(*args, **kwargs):
        calls["count"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """fp8.MIN_ROWS 1 (see the docstring), and the number of torch._scaled_mm calls so far."""
    from eridiffusion.trainers import fp8
    monkeypatch.setattr(fp8, "MIN_ROWS", 1)
    return counted_scaled_mm(monkeypatch)


@pytest.fixture(params=ARCHS)
def p(request, comfy_folders, tiny):
    return prepared(comfy_folders, tiny, arch=request.param)


# every architecture fp8_compute applies to (Flux Kontext is Flux's model with reference latents)
@pytest.fixture(params=["flux", "sd3", "zimage", "chroma", "qwen_image", "flux2"])
def any_dit(request, comfy_folders, tiny):
    return prepared(comfy_folders, tiny, arch=request.param)


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("one_kernel", [True, False], ids=["fused_cast", "separate_cast"])
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "per_tensor"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("rows", [40, 1])
def test_fp8_linear_forward_and_input_gradient_agree_with_the_wide_product(rowwise, stored, one_kernel, rows,
                                                                           scaled_mm_calls, monkeypatch,
                                                                           device="cpu"):
    from eridiffusion.trainers import fp8
    if device == "cpu":
        monkeypatch.setattr(fp8, "_writes_fp8", lambda device: one_kernel)
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=gen) * 0.05)
        layer.bias.copy_(torch.randn(48, generator=gen))
        layer.to(stored if stored != torch.float8_e4m3fn else torch.float32)
        if stored == torch.float8_e4m3fn:
            layer.weight.data = layer.weight.data.to(stored)
    layer.requires_grad_(False).to(device)
    weight = layer.weight.float()
    x = (torch.randn(rows, 64, generator=gen) * 3).to(device).requires_grad_()
    grad = torch.randn(rows, 48, generator=gen).to(device) * 1e-3
    forward = fp8.Fp8Forward(layer, fp8.Fp8Gemm(layer, rowwise, True))
    out = forward(x)
    out.backward(grad)
    expected = torch.nn.functional.linear(x.detach(), weight, layer.bias.float())
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert _relative_error(out, expected) < 0.05
    assert _relative_error(x.grad, grad @ weight) < 0.08
    assert layer.weight.grad is None and scaled_mm_calls["count"] == 2


def fp8_operands(dtype, device="cpu", on_grid=False):
    """Operands a quantization meets: rows of very different magnitudes, a row of zeros, a row whose largest
    value sits on a scale's boundary (0.875·2^k: the largest k keeps it in range exactly), negative values, and
    rows longer than one block of the row kernel. `on_grid`: every value is ±(1 + m/4)·2^e, which both FP8 formats
    hold once scaled (Triton's interpreter rounds to FP8 wrongly: 31.5 to 16, where the GPU's conversion gives
    32), so the CPU checks the kernels' scales, layouts and loops, and the GPU their rounding as well."""
    gen = torch.Generator().manual_seed(3)
    if on_grid:
        mantissa = 1 + torch.randint(0, 4, (37, 4200), generator=gen) / 4
        sign = torch.randint(0, 2, (37, 4200), generator=gen) * 2 - 1
        x = sign * mantissa * 2.0 ** torch.randint(-3, 4, (37, 4200), generator=gen)
        x = x * 2.0 ** torch.arange(-20, 17).unsqueeze(1)
    else:
        x = torch.randn(37, 4200, generator=gen) * torch.logspace(-6, 4, 37).unsqueeze(1)
    x[5] = 0
    x[6, 100] = -0.875 * 2 ** (-10 if on_grid else 7)     # (on the grid: the row's own largest magnitude)
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_quantization_kernels_give_torchs_result_bit_for_bit(dtype, monkeypatch, device="cpu", on_grid=True):
    """The Triton kernels that quantize activations, gradients and weights (trainers/fp8.py) compute exactly
    what the torch reference computes: the same FP8 bits and the same power-of-two scales, per row and per
    tensor, e4m3 and e5m2, written transposed or not, from a weight stored in e4m3 too. On the CPU they run in
    Triton's interpreter; test_fp8_compute_gpu.py runs this on the GPU's compiled kernels."""
    pytest.importorskip("triton")
    from eridiffusion.trainers import fp8, fused
    if device == "cpu" and not fused.INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton loaded")
    monkeypatch.setattr(fp8, "KERNELS_ON_CPU", True)
    x = fp8_operands(torch.float32, device, on_grid)
    # one scale for the whole tensor: on the grid, rows within FP8's normal range of each other (and the zeros)
    whole = (x[[5, 20, 21, 22]] if on_grid else x).to(dtype)
    if dtype == torch.float16:      # fp16 holds the rows from 2^-14 to 2^15
        x, whole = (x[6:30], whole) if on_grid else (x[10:34], x[10:34])
    x = x.to(dtype)

    def reference(x, fmt):
        multiplier, dequant = fp8._power_of_two_scale(fp8._amax_rows(x), fmt)
        return fp8._quantized(x, multiplier, fmt), dequant

    def bits(t):
        return t.view(torch.uint8)

    for fmt in (fp8.E4M3, fp8.E5M2):
        for single_pass in (fp8.ROW_SINGLE_PASS, 1024):      # rows read once, and rows longer than that
            monkeypatch.setattr(fp8, "ROW_SINGLE_PASS", single_pass)
            q, dequant = fp8.quantize_rows(x, fmt)
            expected, expected_dequant = reference(x, fmt)
            assert torch.equal(bits(q), bits(expected)) and torch.equal(dequant, expected_dequant)
        q, dequant = fp8.quantize_tensor(whole, fmt)
        multiplier, expected_dequant = fp8._power_of_two_scale(fp8._amax(whole), fmt)
        assert torch.equal(bits(q), bits(fp8._quantized(whole, multiplier, fmt))) and dequant.shape == ()
        assert torch.equal(dequant, expected_dequant.reshape(()))
    rows_multiplier, _ = fp8._power_of_two_scale(fp8._amax_rows(x), fp8.E4M3)
    tensor_multiplier, _ = fp8._power_of_two_scale(fp8._amax(whole), fp8.E4M3)
    for operand, multiplier in ((x, rows_multiplier), (whole, tensor_multiplier)):
        for transposed in (False, True):
            q = fp8.scaled_cast(operand, multiplier, fp8.E4M3, transposed)
            expected = fp8._quantized(operand, multiplier, fp8.E4M3, transposed)
            assert q.stride() == expected.stride() and torch.equal(bits(q), bits(expected))
    stored = fp8._quantized(whole, tensor_multiplier, fp8.E4M3)
    copied = fp8.scaled_cast(stored, torch.ones(1, 1, device=device), fp8.E4M3, transposed=True)
    assert copied.stride() == (1, whole.shape[0]) and torch.equal(bits(copied), bits(stored.t().contiguous().t()))


def test_layers_that_do_not_qualify_run_their_own_forward(scaled_mm_calls):
    from eridiffusion.trainers import fp8
    odd = torch.nn.Linear(40, 48).requires_grad_(False)     # in_features not a multiple of 16
    assert not fp8.qualifies(odd)
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    forward = fp8.Fp8Forward(layer, fp8.Fp8Gemm(layer, True, True))
    x = torch.randn(4, 64)
    fp8.MIN_ROWS = 8      # (restored by the fixture's monkeypatch)
    assert torch.equal(forward(x), layer(x)) and scaled_mm_calls["count"] == 0     # 4 rows < MIN_ROWS
    assert forward.weight(torch.randn(16, 64)) is layer.weight
    # a weight stored in e4m3 has nothing to quantize: FP8 from one row (a modulation Linear's one row per sample)
    stored = torch.nn.Linear(64, 48).requires_grad_(False)
    stored.weight.data = stored.weight.data.to(fp8.E4M3)
    stored_forward = fp8.Fp8Forward(stored, fp8.Fp8Gemm(stored, True, True))
    assert stored_forward.weight(torch.randn(1, 64)) is stored.weight
    one_row = torch.randn(1, 64)
    assert stored_forward(one_row).shape == (1, 48) and scaled_mm_calls["count"] == 1
    # a weight elsewhere than the activations (memory_budget_gb streams it from CPU memory): its own cast path
    assert forward.weight(torch.randn(16, 64, device="meta")) is None
    layer.weight_function = [lambda w: w]    # a stacked LoRA's weight function: ComfyUI's own cast path
    assert forward.weight(torch.randn(16, 64)) is None


def _train_run(p, **overrides):
    from eridiffusion.trainers.loop import TrainingRun
    return TrainingRun(p["model"], p["adapter"], p["latents"], p["captions"], settings(**overrides), end_step=1)


def test_fp8_training_follows_the_wide_run_and_its_gradients(any_dit, scaled_mm_calls):
    """Losses of 5 steps within 5 % of fp32's, and one batch's adapter gradients (after 3 steps, so that LoRA's
    up is no longer zero) with cosine ≥ 0.99."""
    from eridiffusion.trainers.comfy_compat import training_mode
    p = any_dit
    _, wide, _ = train(p, 5, learning_rate=1e-2)
    _, narrow, _ = train(p, 5, learning_rate=1e-2, fp8_compute=True)
    assert scaled_mm_calls["count"] > 0
    logging.info("fp8 loss relative differences %s", [abs(a - b) / b for a, b in zip(narrow.history.losses,
                                                                                     wide.history.losses)])
    assert narrow.history.losses == pytest.approx(wide.history.losses, rel=0.05)
    assert narrow.history.losses != wide.history.losses
    gradients = {}
    for on in (False, True):
        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            run_ = _train_run({**p, "adapter": wide}, learning_rate=1e-2, fp8_compute=on)
            _, grads = run_._loss_and_gradients(run_._micro_batch())
            gradients[on] = torch.cat([g.flatten() for g in grads])
            del run_
    cosine = torch.nn.functional.cosine_similarity(gradients[True], gradients[False], dim=0).item()
    logging.info("fp8 gradient cosine %.5f", cosine)
    assert gradients[False].norm() > 0 and cosine >= 0.99


def test_fp8_training_leaves_the_model_and_its_clones_and_samples_as_the_stock_loader(p, scaled_mm_calls, caplog):
    from nodes import LoraLoaderModelOnly
    from eridiffusion.nodes.adapter import EriSaveAdapter
    clone = p["model"].clone()
    weights = {k: v.clone() for k, v in p["model"].model.diffusion_model.state_dict().items()}
    before, before_clone = model_output(p["model"], p), model_output(clone, p)
    trained_model, adapter, _ = train(p, 5, learning_rate=1e-2, fp8_compute=True, gradient_checkpointing=True)
    assert scaled_mm_calls["count"] > 0
    assert all(torch.equal(v, weights[k]) for k, v in p["model"].model.diffusion_model.state_dict().items())
    calls = scaled_mm_calls["count"]
    assert torch.equal(model_output(p["model"], p), before) and torch.equal(model_output(clone, p), before_clone)
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix="eri/fp8", save_dtype="fp32")[0]
    with caplog.at_level(logging.WARNING):
        (loaded,) = LoraLoaderModelOnly().load_lora_model_only(p["model"], name, 1.0)
    assert "lora key not loaded" not in caplog.text
    expected, got = model_output(trained_model, p), model_output(loaded, p)
    assert scaled_mm_calls["count"] == calls        # sampling never runs FP8
    assert not torch.allclose(expected, before)
    assert (got - expected).norm() / expected.norm() <= 1e-3


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_recompute_layers_off_runs_each_fp8_product_as_often_as_without_checkpointing(comfy_folders, tiny, arch,
                                                                                      scaled_mm_calls):
    """The FP8 GEMMs of checkpointed blocks (LoRA-adapted layers and plain ones, the modulation's) are kept from the
    forward: the recomputation runs none of them; the weights are those of full recomputation bit for bit."""
    p = prepared(comfy_folders, tiny, arch=arch)
    runs = {}
    for name, options in {"recomputed": {}, "no_checkpointing": {"gradient_checkpointing": False},
                          "kept": {"recompute_layers": False}}.items():
        before = scaled_mm_calls["count"]
        _, adapter, _ = train(p, 2, learning_rate=1e-2, fp8_compute=True, compile="off",
                              **{"gradient_checkpointing": True, **options})
        runs[name] = (adapter, scaled_mm_calls["count"] - before)
    assert 0 < runs["no_checkpointing"][1] == runs["kept"][1] < runs["recomputed"][1]
    kept, recomputed = runs["kept"][0].weights, runs["recomputed"][0].weights
    assert all(torch.equal(kept[k], recomputed[k]) for k in kept)


@pytest.mark.parametrize("arch", ["flux"])
def test_fp8_training_chains_and_resumes_bit_exactly(comfy_folders, tiny, arch, scaled_mm_calls):
    p = prepared(comfy_folders, tiny, arch=arch)
    assert_chained_and_resumed_equal_one_run(p, 4, "eri/fp8half", batch_size=2, gradient_checkpointing=True,
                                             fp8_compute=True)
    assert scaled_mm_calls["count"] > 0


def test_a_model_with_fp8_weights_computes_with_them_as_stored(comfy_folders, tiny, scaled_mm_calls, monkeypatch):
    """ComfyUI's weight_dtype fp8_e4m3fn: the stored e4m3 weights go into the GEMM as they are (no cast to bf16
    and back), in the fused LoRA path too; the adapter trains in bf16."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.trainers import fp8
    p = prepared(comfy_folders, tiny, arch="flux")
    with torch.inference_mode(False):
        model = tiny.tiny_model("flux", dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    stored = {t.data_ptr() for t in model.model.diffusion_model.parameters() if t.dtype == torch.float8_e4m3fn}
    used = []
    real = fp8.Fp8Gemm.forward

    def forward(self, x, weight, bias, out_dtype):
        used.append(weight.data_ptr() in stored and weight.dtype == torch.float8_e4m3fn)
        return real(self, x, weight, bias, out_dtype)

    monkeypatch.setattr(fp8.Fp8Gemm, "forward", forward)
    adapter = run(EriCreateAdapter, model=model, adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
                  seed=0, dtype="bf16")[0]
    q = {**p, "model": model, "adapter": adapter}
    _, wide, _ = train(q, 3, learning_rate=1e-2, precision="bf16")
    _, narrow, _ = train(q, 3, learning_rate=1e-2, precision="bf16", fp8_compute=True)
    assert used and all(used)
    assert all(v.dtype == torch.bfloat16 for v in narrow.weights.values())
    assert narrow.history.losses == pytest.approx(wide.history.losses, rel=0.05)


def test_sdxl_ignores_fp8_compute_with_a_warning(comfy_folders, tiny, scaled_mm_calls, caplog):
    p = prepared(comfy_folders, tiny, arch="sdxl")
    _, plain, _ = train(p, 2)
    with caplog.at_level(logging.WARNING):
        _, ignored, _ = train(p, 2, fp8_compute=True)
    assert "fp8_compute True is ignored: it applies to" in caplog.text
    assert ignored.history.losses == plain.history.losses and scaled_mm_calls["count"] == 0


def test_a_gpu_without_fp8_is_refused_at_queue_naming_the_input(monkeypatch):
    import comfy.model_management
    from eridiffusion.nodes.train import EriTrainingSettings
    assert EriTrainingSettings.validate_inputs(fp8_compute=True) is True      # the CPU runs _scaled_mm
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    verdict = EriTrainingSettings.validate_inputs(fp8_compute=True)
    assert "fp8_compute needs an NVIDIA GPU" in verdict and "A100 is 8.0" in verdict
    assert "turn fp8_compute off" in verdict
    assert EriTrainingSettings.validate_inputs(fp8_compute=False) is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert EriTrainingSettings.validate_inputs(fp8_compute=True) is True



@pytest.mark.parametrize("quant_format", ["scaled_fp8", "float8_e4m3fn", "int8_tensorwise"])
def test_quantized_checkpoints_train_with_fp8_compute(comfy_folders, tiny, tmp_path, quant_format, scaled_mm_calls,
                                                      monkeypatch):
    """Weights stored in e4m3 with one scale per tensor — a scaled-fp8 file (0.3.75: e4m3 weights and their
    scale_weight; 0.33 converts it to its quantized layers), ComfyUI's float8_e4m3fn layers — go into the product
    as stored, adapted or not; other quantized layers (int8) keep the path they have without fp8_compute. Either
    way the run follows the one without it."""
    from test_quantized_layers import quantized_p
    from eridiffusion.trainers import fp8
    p = quantized_p(comfy_folders, tiny, tmp_path, quant_format)
    as_stored = []
    real = fp8.Fp8Gemm.forward

    def forward(self, x, weight, bias, out_dtype):
        as_stored.append(weight.dtype == torch.float8_e4m3fn)
        return real(self, x, weight, bias, out_dtype)

    monkeypatch.setattr(fp8.Fp8Gemm, "forward", forward)
    _, wide, _ = train(p, 3, learning_rate=1e-2)
    _, narrow, _ = train(p, 3, learning_rate=1e-2, fp8_compute=True)
    assert narrow.history.losses == pytest.approx(wide.history.losses, rel=0.05)
    if quant_format == "int8_tensorwise":
        assert scaled_mm_calls["count"] == 0 and not as_stored
    else:
        assert scaled_mm_calls["count"] > 0 and as_stored and all(as_stored)

@pytest.mark.parametrize("type_id", ["dora", "lokr", "loha"])
def test_other_adapter_types_train_on_the_fp8_base_and_load_as_trained(comfy_folders, tiny, type_id, scaled_mm_calls,
                                                                       caplog):
    """DoRA, LoKr, LoHa add their delta to the base layer's own forward, which runs in FP8 (LoRA's fused path is
    the tests above); the file loads in the stock loader with the output of the trained MODEL."""
    from test_adapter_types import create, relative_error, save, stock_load
    p = prepared(comfy_folders, tiny, arch="flux")
    p["adapter"] = create(p, type_id)
    _, wide, _ = train(p, 4, learning_rate=1e-2)
    model, narrow, _ = train(p, 4, learning_rate=1e-2, fp8_compute=True)
    assert scaled_mm_calls["count"] > 0
    assert narrow.history.losses == pytest.approx(wide.history.losses, rel=0.05)
    loaded = stock_load(p, save(narrow, f"eri/fp8_{type_id}"), caplog)
    assert relative_error(model_output(loaded, p), model_output(model, p)) <= 1e-3


def test_a_model_sampling_loaded_under_inference_mode_trains_with_fp8_compute(comfy_folders, tiny, scaled_mm_calls):
    """A MODEL that a sampler moved to the GPU before training has weights made under inference mode (ComfyUI
    samples in it); autograd refuses to save such tensors for backward, so the FP8 product must not save the
    frozen weight (seen on an H200). Here the tiny model's weights are remade under inference mode on the CPU."""
    from eridiffusion.trainers.loop import train
    p = prepared(comfy_folders, tiny, arch="flux")
    with torch.inference_mode():
        p["model"].model.diffusion_model.to(torch.float64).to(torch.float32)
    assert all(w.is_inference() for w in p["model"].model.diffusion_model.parameters())
    with torch.inference_mode(False):
        result = train(p["model"], p["adapter"], p["latents"], p["captions"], settings(fp8_compute=True), 2)
    assert scaled_mm_calls["count"] > 0 and len(result.history.losses) == 2
