"""The tiny models the tests use are real ComfyUI models: they build, run and sample like full-size ones."""
import pytest
import torch

import comfy.model_management
import comfy.sd


@pytest.mark.parametrize("arch,channels", [("sdxl", 4), ("sdxl_v", 4), ("sd3", 16), ("flux", 16),
                                           ("flux_schnell", 16)])
def test_tiny_model_predicts_through_comfyuis_apply_model_on_its_text_encoders_output(tiny, arch, channels):
    model, clip = tiny.tiny_model(arch), tiny.tiny_clip(arch)
    x = torch.randn(1, channels, 8, 8)
    with torch.inference_mode():
        ctx, pooled = clip.encode_from_tokens(clip.tokenize("a red square"), return_pooled=True)
        cond = {"c_crossattn": ctx, "y": model.model.encode_adm(pooled_output=pooled, width=64, height=64)}
        if arch == "flux":
            cond["guidance"] = torch.tensor([3.5])
        comfy.model_management.load_models_gpu([model])
        out = model.model.apply_model(x, torch.tensor([1.0 if arch.startswith("sdxl") else 0.5]), **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sdxl_v_prediction_model_is_detected_as_v_prediction(tiny):
    import comfy.model_sampling
    assert isinstance(tiny.tiny_model("sdxl_v").model.model_sampling, comfy.model_sampling.V_PREDICTION)
    assert isinstance(tiny.tiny_model("sdxl").model.model_sampling, comfy.model_sampling.EPS)


@pytest.mark.parametrize("channels", [4, 16])
def test_taesd_state_dict_is_detected_by_comfyuis_vae_loader(tiny, channels):
    vae = comfy.sd.VAE(sd=tiny.taesd_state_dict(channels))
    with torch.inference_mode():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        image = vae.decode(latent)
    assert latent.shape == (1, channels, 8, 8) and image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()


def test_tiny_qwen_image_runs_on_its_wan_vaes_one_frame_latents_and_its_text_encoders_context(tiny):
    """ComfyUI detects the tiny VAE as a Wan 2.1 VAE (an image encodes to (1, 16, 1, h, w)), Qwen2.5-VL's
    context (no pooled output) conditions the model, which predicts on that 5D latent."""
    model, clip, vae = tiny.tiny_model("qwen_image"), tiny.tiny_clip("qwen_image"), tiny.tiny_vae("qwen_image")
    with torch.inference_mode():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        ctx, pooled = clip.encode_from_tokens(clip.tokenize("a red square"), return_pooled=True)
        comfy.model_management.load_models_gpu([model])
        out = model.model.apply_model(latent, torch.tensor([0.5]), c_crossattn=ctx)
    assert latent.shape == (1, 16, 1, 8, 8) and pooled is None and ctx.shape[-1] == 64
    assert out.shape == latent.shape and torch.isfinite(out).all()

