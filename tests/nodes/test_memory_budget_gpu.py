"""memory_budget_gb on the GPU: the streamed layers' weights stay in CPU memory while training, ComfyUI copies
them to the GPU per use, and training equals training with the whole model on the GPU (bf16: to the tolerances of
test_checkpointing_gpu.py). 1024-pixel images, so that the GPU has work to queue and the host runs ahead of it,
where a copy that is not ordered with the kernels reading it would show (trainers/offload.py). Needs a GPU:
`ERI_TEST_DEVICE=cuda scripts/test -m gpu`; skipped on the CPU."""
import pytest
import torch

from helpers import prepared, settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
    reason="needs a GPU (ERI_TEST_DEVICE=cuda)")]

OPTIONS = dict(precision="bf16", learning_rate=1e-3, gradient_checkpointing=True, batch_size=2)


def train(p, steps, on_step=None, **overrides):
    from eridiffusion.trainers.loop import train as train_steps
    with torch.inference_mode(False):
        return train_steps(p["model"], p["adapter"], p["latents"], p["captions"],
                           settings(**{**OPTIONS, **overrides}), steps, on_step=on_step)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
@pytest.mark.parametrize("compile_mode", ["off", "cuda_graphs"])
def test_streamed_weights_stay_in_cpu_memory_and_train_as_the_whole_model_does(comfy_folders, tiny, arch,
                                                                               compile_mode):
    from eridiffusion.trainers.offload import streamed_layers
    p = prepared(comfy_folders, tiny, arch=arch, sizes=((1024, 1024),) * 4, resolution=1024, min_side=64,
                 max_side=1024)
    root = p["model"].model.diffusion_model
    seen = []

    def watch(report):
        names = streamed_layers(root)
        seen.append((len(names), {root.get_submodule(n).weight.device.type for n in names
                                  if getattr(root.get_submodule(n), "weight", None) is not None}))
    budgeted = train(p, 4, watch, memory_budget_gb=1e-4, compile=compile_mode)
    full = train(p, 4, compile=compile_mode)
    assert all(count > 20 and devices == {"cpu"} for count, devices in seen)
    assert budgeted.history.losses == pytest.approx(full.history.losses, rel=1e-3)
    start = p["adapter"].weights
    change = torch.cat([(full.weights[k] - start[k]).flatten() for k in start])
    difference = torch.cat([(budgeted.weights[k] - full.weights[k]).flatten() for k in start])
    assert change.norm() > 0 and difference.norm() <= 0.1 * change.norm()


def test_the_load_itself_stays_within_the_budget(comfy_folders, tiny):
    """ComfyUI loads up to 40 % of the free memory's worth of a model that does not fit before training's
    partially_unload takes the excess back: on a card larger than the budget the load alone would pass it."""
    import comfy.model_management
    from eridiffusion.trainers import offload
    p = prepared(comfy_folders, tiny, arch="sdxl")
    comfy.model_management.unload_all_models()
    clone = p["model"].clone()
    resident = clone.model_size() // 3
    largest = max(m.weight.numel() * m.weight.element_size() for m in clone.model.modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(False):
        offload.load([clone], resident)
    assert 0 < clone.loaded_size() <= resident
    assert torch.cuda.max_memory_allocated() - before <= resident + largest
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("budget", [0.0, 1e-4], ids=["whole_model", "streamed"])
def test_a_model_a_sampler_loaded_first_trains_as_a_fresh_one(comfy_folders, tiny, budget):
    """A sampler loads the MODEL under torch.inference_mode, which makes its weights inference tensors that
    autograd cannot save for backward; training the same MODEL afterwards trains as it does on a fresh load."""
    import comfy.model_management
    from helpers import model_output
    p = prepared(comfy_folders, tiny, arch="sdxl", sizes=((512, 512),) * 2, resolution=512, min_side=64,
                 max_side=512)
    fresh = train(p, 3, memory_budget_gb=budget)
    comfy.model_management.unload_all_models()
    model_output(p["model"], p)       # loaded by load_models_gpu under inference mode, as KSampler does
    assert any(w.is_inference() for w in p["model"].model.diffusion_model.parameters())
    again = train(p, 3, memory_budget_gb=budget)
    assert again.history.losses == pytest.approx(fresh.history.losses, rel=1e-3)
