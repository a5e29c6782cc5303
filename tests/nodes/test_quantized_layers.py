"""Adapters on quantized checkpoints: layers whose weights ComfyUI keeps quantized (scaled fp8 files, and the
per-layer formats of ComfyUI's quantized ops: fp8, int8, nvfp4) are found by Create adapter, train, save,
and the file loads in ComfyUI's stock LoraLoaderModelOnly on the same quantized MODEL as trained."""
import contextlib
import math

import pytest
import torch

import helpers
from helpers import prepared, train
from test_adapter_types import create, relative_error, save, stock_load

# adapter type ids of test_adapter_types.TYPES without convolutions (SD3 has none)
TYPE_IDS = ("lora", "dora", "lokr", "loha")


def quantized_p(comfy_folders, tiny, tmp_path, quant_format):
    """`prepared` SD3 inputs with the MODEL loaded from a file quantized to `quant_format`."""
    from eri_test_nodes.tiny_models import QUANTIZED_FORMATS, quantized_formats
    assert quant_format in QUANTIZED_FORMATS
    if quant_format not in quantized_formats():
        pytest.skip(f"this ComfyUI's quantized ops (comfy/quant_ops.py QUANT_ALGOS) have no {quant_format}")
    p = prepared(comfy_folders, tiny, "sd3")
    with torch.inference_mode(False):
        p["model"] = tiny.tiny_quantized_sd3(quant_format, tmp_path)
    return p


def model_output(model_patcher, p, load=None):
    """helpers.model_output outside inference mode: ComfyUI cannot load a model with QuantizedTensor weights
    on the CPU under torch.inference_mode (moving or detaching such a weight there fails with "Cannot set
    version_counter for inference tensor"; 0.33's _quantized_apply re-wraps each as a Parameter)."""
    return helpers.model_output(model_patcher, p, inference_mode=False, load=load)


def per_layer_patches_requantize() -> bool:
    """Whether this ComfyUI's per-layer weight patches (model_patcher.LowVramPatch) store W + ΔW back in the
    layer's format through its set_weight (0.3.75) rather than keep it in the compute dtype (0.33): asked by
    applying a zero patch with a set_weight that records its call."""
    import comfy.model_patcher
    calls = []

    def set_weight(weight, **kwargs):
        calls.append(weight)
        return weight

    patches = {"layer.weight": [(1.0, (torch.zeros(2, 2),), 1.0, None, None)]}
    comfy.model_patcher.LowVramPatch("layer.weight", patches, None, set_weight)(torch.ones(2, 2))
    return bool(calls)


@contextlib.contextmanager
def patched_per_layer(model_patcher):
    """The MODEL loaded with its weight patches applied per layer at each call, as ComfyUI 0.33 applies them
    on a GPU by default (dynamic VRAM) and in lowvram mode: each layer dequantizes its weight and adds the
    patch's ΔW in the compute dtype. (A full load, what the CPU gets, instead stores W + ΔW requantized to
    the layer's format once; see the full-load test.)"""
    import comfy.model_management
    comfy.model_management.unload_all_models()
    model_patcher.patch_model(model_patcher.load_device, lowvram_model_memory=1)
    try:
        yield
    finally:
        model_patcher.unpatch_model(model_patcher.offload_device)


def requantization_bound(comfy_folders, tiny, p) -> float:
    """What requantizing every patched weight (W + ΔW rounded back to the layer's format, as ComfyUI stores a
    fully loaded patch) may change the output by: twice the checkpoint's own rounding, as ComfyUI requantizes
    by stochastic rounding, whose error is on average √2 times that of the round-to-nearest that made the
    checkpoint."""
    return 2 * quantization_error(comfy_folders, tiny, p)


def quantization_error(comfy_folders, tiny, p) -> float:
    """How much quantizing the checkpoint changed the MODEL's output (relative to the unquantized tiny SD3
    it was made from)."""
    unquantized = prepared(comfy_folders, tiny, "sd3")["model"]
    return relative_error(model_output(p["model"], p), model_output(unquantized, p))


@pytest.fixture(params=("scaled_fp8", "float8_e4m3fn", "int8_tensorwise", "nvfp4"))
def quant_format(request):
    return request.param


def stored_quantized(layer) -> bool:
    """The layer keeps its weight quantized: a QuantizedTensor (ComfyUI's quantized ops) or fp8 data with a
    separate scale (0.3.75's scaled-fp8 ops)."""
    import comfy.quant_ops
    return isinstance(layer.weight, comfy.quant_ops.QuantizedTensor) or layer.weight.dtype == torch.float8_e4m3fn


def test_create_adapter_finds_the_same_layers_as_on_the_unquantized_model(comfy_folders, tiny, tmp_path,
                                                                            quant_format):
    p = quantized_p(comfy_folders, tiny, tmp_path, quant_format)
    unquantized_targets = create(prepared(comfy_folders, tiny, "sd3"), "lora").spec.targets
    targets = create(p, "lora").spec.targets
    assert targets == unquantized_targets
    root = p["model"].model.diffusion_model
    assert all(stored_quantized(root.get_submodule(t[0])) for t in targets), "the file's block layers load quantized"


@pytest.mark.parametrize("type_id", TYPE_IDS)
def test_an_adapter_on_quantized_layers_trains_and_loads_in_the_stock_loader_as_trained(
        comfy_folders, tiny, tmp_path, caplog, quant_format, type_id):
    """Where ComfyUI applies the stock loader's patches per layer in the compute dtype (0.33: dynamic VRAM on
    a GPU, lowvram mode), it shows the trained output within 1e-3; where it requantizes every patched weight
    (0.3.75), within the requantization bound."""
    from eridiffusion.trainers.state import patched_model
    p = quantized_p(comfy_folders, tiny, tmp_path, quant_format)
    rounding = quantization_error(comfy_folders, tiny, p)
    exact = not per_layer_patches_requantize()
    stock_output = lambda model: model_output(model, p, load=patched_per_layer if exact else None)
    adapter = create(p, type_id)
    base = model_output(p["model"], p)
    fresh = model_output(patched_model(p["model"], adapter), p)
    # An adapted layer computes dequantized, as under the stock loader's per-layer patches: a new adapter
    # differs from the MODEL alone only where the layer's own forward rounds its input too (int8 here), by
    # less than quantizing the checkpoint changed the output.
    assert relative_error(fresh, base) <= rounding
    if exact:
        untrained = stock_load(p, save(adapter, f"quantized/{quant_format}_{type_id}_new"), caplog)
        torch.testing.assert_close(fresh, stock_output(untrained), rtol=1e-5, atol=1e-6)
    trained_model, trained, history = train(p, 5, adapter=adapter, learning_rate=2e-2)
    assert all(math.isfinite(loss) for loss in history.losses)
    expected = model_output(trained_model, p)
    assert relative_error(expected, base) > 1e-2, "training changed the output"
    got = stock_output(stock_load(p, save(trained, f"quantized/{quant_format}_{type_id}"), caplog))
    assert relative_error(got, expected) <= (1e-3 if exact else requantization_bound(comfy_folders, tiny, p))


def test_a_full_load_in_the_stock_loader_is_off_by_no_more_than_requantizing(
        comfy_folders, tiny, tmp_path, caplog, quant_format):
    """A full load (what the CPU gets) stores each patched weight requantized, W + ΔW rounded to the layer's
    format, so the stock loader's output there differs from the trained one by that rounding."""
    p = quantized_p(comfy_folders, tiny, tmp_path, quant_format)
    trained_model, trained, _ = train(p, 5, adapter=create(p, "lora"), learning_rate=2e-2)
    expected = model_output(trained_model, p)
    got = model_output(stock_load(p, save(trained, f"quantized/{quant_format}_full_load"), caplog), p)
    assert relative_error(got, expected) <= requantization_bound(comfy_folders, tiny, p)


def test_a_file_of_another_trainer_loads_on_the_quantized_layers_and_trains_on(
        comfy_folders, tiny, tmp_path, quant_format):
    """Load adapter maps a kohya file's layers onto the quantized MODEL's layers (its importer takes them as
    linear layers) and gives the trained output."""
    from safetensors.torch import load_file
    from eridiffusion.nodes.adapter import EriLoadAdapter
    from eridiffusion.trainers.state import patched_model
    from helpers import run
    from test_adapter_types import _foreign, write_file
    p = quantized_p(comfy_folders, tiny, tmp_path, quant_format)
    trained_model, trained, _ = train(p, 2, adapter=create(p, "lora"), learning_rate=2e-2)
    ours = load_file(str(comfy_folders["loras"] / save(trained, f"quantized/{quant_format}_source")))
    name = write_file(comfy_folders["loras"], f"kohya_{quant_format}.safetensors",
                      _foreign(ours, "kohya", trained.spec, p["model"].model.model_config.unet_config))
    loaded = run(EriLoadAdapter, lora_name=name, model=p["model"])[0]
    assert sorted(loaded.spec.targets) == sorted(trained.spec.targets)
    expected = model_output(trained_model, p)
    assert relative_error(model_output(patched_model(p["model"], loaded), p), expected) <= 1e-3
    _, continued, history = train(p, 2, adapter=loaded)
    assert continued.step == 2 and all(math.isfinite(loss) for loss in history.losses)
