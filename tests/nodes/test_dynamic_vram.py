"""Training a MODEL that ComfyUI 0.33 loaded with dynamic VRAM on (its main.py's default on NVIDIA), on the CPU:
what does not need comfy-aimdo's GPU side. With it on, ComfyUI's layers are made without weights and take the
file's tensors as they are, so the non-dynamic delegate that training runs on (trainers/comfy_compat.py:
trainable_patcher) holds, say, a bf16 file's weights under an fp16 SDXL on a GPU (found there: "mat1 and mat2 must
have the same dtype"); a load with --disable-dynamic-vram converts them to the model's dtype. Training must train
what that load gives."""
import pytest
import torch

from helpers import prepared, settings
from test_dynamic_vram_gpu import _comfyui_has_dynamic_vram, detect_as_wide, wide_model_file


pytestmark = pytest.mark.skipif(not _comfyui_has_dynamic_vram(), reason="ComfyUI before 0.33 has no dynamic VRAM")


def trained(model, p, budget, steps=2):
    """(losses, adapter weights) of `steps` steps computed in the model's own dtype (fp32 on the CPU; on a GPU
    precision auto does the same for an fp16 SDXL or a bf16 Flux): no autocast, the weights used as they are;
    with memory_budget_gb `budget`."""
    from eridiffusion.trainers.checkpoint import make_spec
    from eridiffusion.trainers.comfy_compat import training_mode
    from eridiffusion.trainers.loop import TrainingRun
    from eridiffusion.trainers.offload import streamed_layers
    from eridiffusion.trainers.state import new_adapter
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        state = new_adapter(make_spec(model, "lora", 4, 4.0, "attention_mlp", 0, "fp32"), model)
        run_settings = settings(precision="fp32", memory_budget_gb=budget, gradient_checkpointing=True)
        run = TrainingRun(model, state, p["latents"], p["captions"], run_settings, end_step=steps)
        for _ in range(steps):
            run.step()
        assert bool(streamed_layers(run.base_model.diffusion_model)) == bool(budget)
        return list(run.losses), run.export().weights


@pytest.mark.parametrize("budget", [0, 1e-4], ids=["whole", "streamed"])   # 1e-4 GiB: every layer streams
@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_a_file_loaded_with_dynamic_vram_trains_as_with_it_disabled(comfy_folders, tiny, tmp_path, monkeypatch, arch,
                                                                    budget):
    import comfy.sd
    import comfy_aimdo.control
    from comfy_env import dynamic_vram
    assert comfy_aimdo.control.init()   # its library, which reads the file under dynamic VRAM (no GPU needed)
    path = wide_model_file(tiny, arch, str(tmp_path))   # bf16, as most published files are
    detect_as_wide(monkeypatch, tiny, arch)
    p = prepared(comfy_folders, tiny, arch=arch)
    legacy = comfy.sd.load_diffusion_model(path, disable_dynamic=True)
    with dynamic_vram():
        # on the CPU ComfyUI makes a legacy ModelPatcher here (ModelPatcherDynamic reroutes CPU devices), loaded
        # as a dynamic MODEL's delegate is on a GPU: bf16 tensors kept under an fp32 model
        dynamic = comfy.sd.load_diffusion_model(path)
        kept = {p.dtype for p in dynamic.model.diffusion_model.parameters()}
        assert torch.bfloat16 in kept and dynamic.model.get_dtype() == torch.float32
        on_dynamic = trained(dynamic, p, budget)
    on_legacy = trained(legacy, p, budget)
    assert on_dynamic[0] == on_legacy[0]
    assert all(torch.equal(on_dynamic[1][k], on_legacy[1][k]) for k in on_legacy[1])
