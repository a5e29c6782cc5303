"""Training on ComfyUI 0.33's dynamic VRAM, what its main.py gives every model on an NVIDIA GPU unless started
with --disable-dynamic-vram: the loaders make `ModelPatcherDynamic` patchers (comfy-aimdo), which keep weights in
host memory and stream each layer's to the GPU at every call. Training runs on the model's non-dynamic delegate
(trainers/comfy_compat.py: trainable_patcher), so it trains what the same file fully loaded trains, with CUDA
graphs and the fused kernels, and the MODEL it returns samples under dynamic VRAM as the fully loaded one does.

The models are the tiny ones made wider, so that their layers' weights are over the 16 KiB below which dynamic
loading keeps a weight resident instead of streaming it. These need a GPU and comfy-aimdo, started as main.py
starts it: `ERI_TEST_DEVICE=cuda ERI_TEST_DYNAMIC_VRAM=1 python -m pytest -m gpu tests/nodes/test_dynamic_vram_gpu.py`
(tests/comfy_env.py); otherwise they are skipped."""
import os

import pytest
import torch

from helpers import prepared, settings


def _comfyui_has_dynamic_vram() -> bool:
    import comfy.model_patcher
    return hasattr(comfy.model_patcher, "ModelPatcherDynamic")


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("ERI_TEST_DYNAMIC_VRAM") != "1" or not _comfyui_has_dynamic_vram(),
    reason="needs a GPU and ComfyUI 0.33's dynamic VRAM (ERI_TEST_DEVICE=cuda ERI_TEST_DYNAMIC_VRAM=1)")]

SIDE = {"sdxl": 512, "flux": 512}


def wide_config(tiny, arch: str):
    """The tiny model's ComfyUI config with 128 (SDXL) / 256 (Flux) channels."""
    import comfy.supported_models
    if arch == "sdxl":
        config = comfy.supported_models.SDXL({**tiny.SDXL_UNET, "model_channels": 128, "num_head_channels": 32})
    else:
        config = comfy.supported_models.Flux({**tiny.FLUX, "hidden_size": 256, "num_heads": 4,
                                              "axes_dim": [16, 24, 24]})
    return config


def wide_model_file(tiny, arch: str, folder) -> str:
    """The wide tiny model written as a diffusion-model file, as UNETLoader reads one."""
    from safetensors.torch import save_file
    config = wide_config(tiny, arch)
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, "")
    tiny.init_parameters(model.diffusion_model, 0)
    path = os.path.join(folder, f"wide_{arch}.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.diffusion_model.state_dict().items()}, path)
    return path


def detect_as_wide(monkeypatch, tiny, arch: str):
    """ComfyUI's model detection knows only the real models' shapes, so it is told this file's config; the rest
    of load_diffusion_model (dtype choice, patcher class, weight loading, the delegate's reload) is ComfyUI's."""
    import comfy.model_detection
    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet",
                        lambda state_dict, prefix, metadata=None, **_: wide_config(tiny, arch))


@pytest.fixture(params=["sdxl", "flux"])
def loaded(request, comfy_folders, tiny, tmp_path, monkeypatch):
    """(dynamic MODEL, fully loaded MODEL of the same file, data) for one architecture."""
    import comfy.model_management
    import comfy.sd
    arch = request.param
    path = wide_model_file(tiny, arch, str(tmp_path))
    detect_as_wide(monkeypatch, tiny, arch)
    p = prepared(comfy_folders, tiny, arch=arch, sizes=((SIDE[arch], SIDE[arch]),) * 2, resolution=SIDE[arch],
                 min_side=64, max_side=SIDE[arch])
    from comfy_env import dynamic_vram
    # the same file in a ComfyUI started with --disable-dynamic-vram. Loaded inside dynamic_vram() too, its layers
    # would be made without weights and take the file's bf16 tensors as they are, where ComfyUI picks fp16 for
    # SDXL and then casts inputs to fp16 (as the non-dynamic delegate is loaded, which training casts for itself)
    legacy = comfy.sd.load_diffusion_model(path, disable_dynamic=True)
    with dynamic_vram():   # as in a ComfyUI started by main.py on an NVIDIA GPU, for the whole test
        dynamic = comfy.sd.load_diffusion_model(path)
        assert dynamic.is_dynamic() and not legacy.is_dynamic()
        yield dynamic, legacy, p
        comfy.model_management.unload_all_models()


def new_weights(model, kind="lora"):
    """The weights a new adapter of run_steps starts from (its seed fixes them)."""
    from eridiffusion.trainers.checkpoint import make_spec
    from eridiffusion.trainers.state import new_adapter
    with torch.inference_mode(False):
        return new_adapter(make_spec(model, "lora", 8, 8.0, "attention_mlp", 0, "fp32", dora=kind == "dora"),
                           model).weights


def run_steps(model, p, steps=3, kind="lora"):
    """TrainingRun as train() runs it: (the run, its losses)."""
    from eridiffusion.trainers.checkpoint import make_spec
    from eridiffusion.trainers.comfy_compat import training_mode
    from eridiffusion.trainers.loop import TrainingRun
    from eridiffusion.trainers.state import new_adapter
    run_settings = settings(precision="bf16", learning_rate=1e-3, gradient_checkpointing=True,
                            compile="cuda_graphs")
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        state = new_adapter(make_spec(model, "lora", 8, 8.0, "attention_mlp", 0, "fp32", dora=kind == "dora"),
                            model)
        run = TrainingRun(model, state, p["latents"], p["captions"], run_settings, end_step=steps)
        for _ in range(steps):
            run.step()
        return run, list(run.losses)


def test_training_on_dynamic_vram_equals_training_the_fully_loaded_model_with_graphs_and_fused_kernels(loaded):
    from eridiffusion.trainers.graphs import GraphedMicroBatches
    dynamic, legacy, p = loaded
    on_dynamic, dynamic_losses = run_steps(dynamic, p)
    assert not on_dynamic.patcher.is_dynamic()
    assert isinstance(on_dynamic.micro_batches, GraphedMicroBatches) and on_dynamic.micro_batches.captures > 0
    # the delegate is loaded whole: no layer casts its weight per call, so LoraLinear and the fused GroupNorm take
    # their fused paths (trainers/fused.py checks comfy_cast_weights at each call)
    assert not any(getattr(m, "comfy_cast_weights", False) for m in on_dynamic.base_model.diffusion_model.modules())
    weights = dict(on_dynamic.export().weights)
    del on_dynamic
    on_legacy, legacy_losses = run_steps(legacy, p)
    assert dynamic_losses == pytest.approx(legacy_losses, rel=1e-3)   # bf16: not bit-reproducible run to run
    other = on_legacy.export().weights
    # bf16 kernels are not bit-reproducible from run to run, and Adam turns gradient noise near zero into steps of
    # the full learning rate: the two runs agree to a tenth of what training changed (as test_memory_budget_gpu.py)
    start = new_weights(legacy)
    change = torch.cat([(other[k] - start[k]).flatten() for k in other])
    difference = torch.cat([(weights[k] - other[k]).flatten() for k in other])
    assert change.norm() > 0 and difference.norm() <= 0.1 * change.norm()
    # a second run reuses the delegate the first one loaded (cached on the dynamic patcher)
    assert dynamic.non_dynamic_delegate_model is not None


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_the_trained_model_samples_on_dynamic_vram_as_the_fully_loaded_one(loaded, kind):
    from helpers import model_output
    from eridiffusion.trainers.state import patched_model
    import comfy.model_management
    dynamic, legacy, p = loaded
    pinned_before = dict(comfy.model_management.PINNED_MEMORY)
    run, _ = run_steps(dynamic, p, steps=2, kind=kind)
    state = run.export()
    del run
    # sampling's view of both MODELs: ComfyUI's apply_model under inference mode, loaded as samplers load it
    streamed = model_output(patched_model(dynamic, state), p)
    resident = model_output(patched_model(legacy, state), p)
    untrained = model_output(legacy, p)
    assert torch.allclose(streamed.float(), resident.float(), rtol=2e-2, atol=2e-2)
    assert (streamed.float() - untrained.float()).abs().max() > (streamed.float() - resident.float()).abs().max()
    # every weight that training and sampling pinned in host memory is released with the models (DoRA's base
    # weight goes through comfy.ops' cast, which pins; uncast_bias_weight releases it)
    comfy.model_management.unload_all_models()
    assert comfy.model_management.PINNED_MEMORY == pinned_before


def test_a_sample_taken_while_training_a_dynamic_model_is_the_stock_ksamplers_on_the_trained_model(loaded):
    """Train steps with Sampling settings on a dynamic MODEL, as a user queues it: the sample it shows at step 3
    is what the stock KSampler gives on the MODEL it outputs, under dynamic VRAM."""
    import nodes as comfy_nodes
    from helpers import run
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from test_sampling import sampling, train
    dynamic, legacy, p = loaded
    # the graph a user wires: Create adapter on the loaded (dynamic) MODEL, then Train steps on both
    adapter = run(EriCreateAdapter, model=dynamic, adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
                  seed=0, dtype="fp32")[0]
    p = {**p, "model": dynamic, "adapter": adapter}
    positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(p["clip"], "")[0]
    settings_ = sampling(p, positive=positive, negative=negative, clip=None, every_n_steps=3, seed=11)
    model, _, _, images, _ = train(p, 3, settings_, learning_rate=1e-2, precision="bf16",
                                   gradient_checkpointing=True)
    latent = {"samples": torch.zeros([1, model.model.latent_format.latent_channels, 8, 8])}
    with torch.inference_mode():
        def decoded(m):
            out = comfy_nodes.common_ksampler(m, 11, 2, 3.0, "euler", "normal", positive, negative, latent)[0]
            return p["vae"].decode(out["samples"]).float()
        stock, untrained = decoded(model), decoded(dynamic)
    assert images.shape[0] == 1
    assert torch.allclose(images[0].float(), stock[0], atol=2e-2)
    assert (images[0].float() - untrained[0]).abs().max() > (images[0].float() - stock[0]).abs().max()
