"""Each architecture's own objective: the noise, timesteps and target that ComfyUI's model_sampling implies."""
import math

import pytest
import torch

from eridiffusion.trainers.arch import Batch, detect
from eridiffusion.trainers.cache import TextEmbedding
from eridiffusion.trainers.config import TrainingSettings
from eridiffusion.trainers.data import Bucket, DatasetItem


def _items(n, width=64, height=64):
    return [DatasetItem(f"{i}.png", "a", 1, False, (width, height), Bucket(width, height), (0, 0), f"h{i}")
            for i in range(n)]


def _batch(n, channels=4, width=64, height=64):
    return Batch(torch.zeros(n, channels, height // 8, width // 8), [], _items(n, width, height))


@pytest.mark.parametrize("arch", ["sdxl", "sdxl_v", "sd3", "flux", "flux_schnell", "chroma", "qwen_image", "flux2", "zimage"])
def test_a_model_that_outputs_the_training_target_denoises_exactly(tiny, arch):
    # ComfyUI samples with calculate_denoised(sigma, model_output, x_noisy): if the model outputs our
    # training target (eps, v, or ε - x0 for rectified flow), that must give back the clean latent.
    model = tiny.tiny_model(arch)
    eri_arch, ms = detect(model), model.model.model_sampling
    channels = model.model.latent_format.latent_channels
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, channels, 8, 8, generator=gen), torch.randn(3, channels, 8, 8, generator=gen)
    sigma = eri_arch.sample_sigmas(ms, _batch(3, channels), gen, TrainingSettings())
    x_noisy = eri_arch.noisy(ms, x0, noise, sigma)
    # What ComfyUI's samplers start from: noise_scaling gives the same noisy latent.
    torch.testing.assert_close(ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0), x_noisy)
    target = eri_arch.target(ms, x0, noise, sigma)
    denoised = ms.calculate_denoised(sigma.view(-1, 1, 1, 1), target, x_noisy)
    torch.testing.assert_close(denoised, x0, rtol=1e-4, atol=1e-4)


def test_sdxl_timesteps_cover_the_1000_ddpm_steps_uniformly(tiny):
    model = tiny.tiny_model("sdxl")
    ms = model.model.model_sampling
    sigma = detect(model).sample_sigmas(ms, _batch(20000), torch.Generator().manual_seed(0), TrainingSettings())
    t = ms.timestep(sigma)
    assert t.min() == 0 and t.max() == 999
    assert abs(t.float().mean().item() - 499.5) < 10


def test_min_snr_weight_caps_the_weight_of_low_noise_steps(tiny):
    model = tiny.tiny_model("sdxl")
    arch, ms = detect(model), model.model.model_sampling
    sigma = torch.tensor([0.03, 1.0, 10.0])
    w = arch.loss_weight(ms, sigma, TrainingSettings(min_snr_gamma=5.0))
    snr = 1 / sigma ** 2
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr)
    assert torch.equal(arch.loss_weight(ms, sigma, TrainingSettings()), torch.ones(3))


def _unshift(sigma, alpha):
    # inverse of σ = αt / (1 + (α-1)t)
    return sigma / (alpha - (alpha - 1) * sigma)


def test_sd3_draws_logit_normal_timesteps_shifted_by_the_models_shift(tiny):
    model = tiny.tiny_model("sd3")
    ms = model.model.model_sampling
    assert ms.shift == 3.0
    sigma = detect(model).sample_sigmas(ms, _batch(20000, 16), torch.Generator().manual_seed(0),
                                        TrainingSettings(timestep_sampling="logit_normal", logit_mean=0.5))
    logit = torch.logit(_unshift(sigma, 3.0))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    # shift 3 moves training toward high noise, as sampling with it does
    assert (sigma > 0.5).float().mean() > 0.7


def test_a_model_sampling_patch_on_the_model_changes_sd3s_shift(tiny):
    import comfy_extras.nodes_model_advanced as advanced
    from eridiffusion.trainers.loop import TrainingRun  # noqa: F401  (the loop reads the patcher's model_sampling)
    model = tiny.tiny_model("sd3")
    patched = advanced.ModelSamplingSD3().patch(model, shift=6.0)[0]
    ms = patched.get_model_object("model_sampling")
    sigma = detect(patched).sample_sigmas(ms, _batch(5000, 16), torch.Generator().manual_seed(0),
                                          TrainingSettings(timestep_sampling="uniform"))
    t = _unshift(sigma, 6.0)
    assert abs(t.mean().item() - 0.5) < 0.02 and t.min() > 0 and t.max() < 1


def test_flux_dev_shift_follows_the_bucket_resolution_like_comfyuis_model_sampling_flux(tiny):
    import comfy_extras.nodes_model_advanced as advanced
    model = tiny.tiny_model("flux")
    arch = detect(model)
    settings = TrainingSettings(timestep_sampling="uniform")
    for width, height in ((1024, 1024), (512, 768), (256, 256)):
        node_ms = advanced.ModelSamplingFlux().patch(model, 1.15, 0.5, width, height)[0] \
            .get_model_object("model_sampling")
        batch = _batch(4000, 16, width, height)
        sigma = arch.sample_sigmas(model.model.model_sampling, batch, torch.Generator().manual_seed(1), settings)
        t = torch.rand(4000, generator=torch.Generator().manual_seed(1))
        # ComfyUI's sigma for the same t at that resolution
        torch.testing.assert_close(sigma, node_ms.sigma(t), rtol=1e-5, atol=1e-6)
    assert math.isclose(arch.shift(model.model.model_sampling, _items(1, 1024, 1024)[0], settings), math.exp(1.15))


def test_flux_schnell_uses_its_own_unshifted_schedule_and_no_guidance(tiny):
    model = tiny.tiny_model("flux_schnell")
    ms = model.model.model_sampling
    sigma = detect(model).sample_sigmas(ms, _batch(4, 16), torch.Generator().manual_seed(3),
                                        TrainingSettings(timestep_sampling="uniform"))
    torch.testing.assert_close(sigma, torch.rand(4, generator=torch.Generator().manual_seed(3)))
    assert not model.model.diffusion_model.params.guidance_embed


def test_a_flux2_without_a_guidance_input_gets_none_and_names_flux_guidance_unused(tiny):
    """Flux.2 klein (ComfyUI's Flux2 model too) has no guidance_in: training gives it no guidance, and a
    flux_guidance set for it is reported as unused."""
    import comfy.supported_models
    config = comfy.supported_models.Flux2({**tiny.FLUX2, "guidance_embed": False})
    base = config.get_model({}, "")
    batch = Batch(torch.zeros(1, 128, 8, 8), [TextEmbedding(torch.zeros(5, 48), torch.zeros(0))], _items(1))
    arch = detect(tiny.tiny_model("flux2"))
    assert set(arch.conditioning(base, batch, TrainingSettings(), "cpu")) == {"context"}
    assert set(arch.unused_settings(base)) == {"flux_guidance"}
    assert arch.unused_settings(tiny.tiny_model("flux2").model) == {}


@pytest.mark.parametrize("arch, channels, mu", [("chroma", 16, 1.15), ("flux2", 128, 2.02)])
def test_chroma_and_flux2_shift_by_the_models_own_mu_at_every_resolution(tiny, arch, channels, mu):
    """Chroma sets no shift: ComfyUI samples it with ModelSamplingFlux's default μ 1.15; Flux.2 sets μ 2.02. A
    KSampler samples either so at every size (α = e^μ), not with Flux-dev's resolution-dependent shift."""
    model = tiny.tiny_model(arch)
    ms = model.model.model_sampling
    settings = TrainingSettings(timestep_sampling="uniform")
    for width, height in ((1024, 1024), (256, 256)):
        sigma = detect(model).sample_sigmas(ms, _batch(500, channels, width, height),
                                            torch.Generator().manual_seed(4), settings)
        t = torch.rand(500, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(sigma, ms.sigma(t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma, math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t))


def test_chroma_predicts_what_comfyuis_sampling_computes_from_its_conditioning(tiny):
    """The T5 context and extra_conds' guidance 0, as a sampler without a FluxGuidance node gives them."""
    from eridiffusion.trainers.cache import TextEmbedding
    model = tiny.tiny_model("chroma")
    base, ms = model.model, model.model.model_sampling
    gen = torch.Generator().manual_seed(5)
    context, x = torch.randn(7, 64, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    # CLIPTextEncode's conditioning from a T5-only encoder: pooled_output None
    conds = base.extra_conds(cross_attn=context.unsqueeze(0), pooled_output=None, noise=x)
    assert set(conds) == {"c_crossattn", "guidance"}
    conds = {k: v.process_cond(batch_size=2, area=None, device="cpu").cond for k, v in conds.items()}
    batch = Batch(x, [TextEmbedding(context, torch.zeros(0))] * 2, _items(2))
    with torch.no_grad():
        ours = detect(model).predict(base, ms, x, sigma, batch, TrainingSettings())
        comfy_denoised = base.apply_model(x, sigma, **conds)
    torch.testing.assert_close(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), ours, x), comfy_denoised)


def test_qwen_image_shifts_by_comfyuis_own_constant_shift_and_a_model_sampling_nodes_shift_wins(tiny):
    """Qwen-Image samples with ModelSamplingFlux at μ 1.15 (α = e^1.15) whatever the size; a
    ModelSamplingAuraFlow node (as Qwen-Image's workflows use) sets the model's own shift."""
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    model = tiny.tiny_model("qwen_image")
    settings = TrainingSettings(timestep_sampling="uniform")
    t = torch.rand(500, generator=torch.Generator().manual_seed(4))
    for width, height in ((1024, 1024), (256, 256)):
        sigma = detect(model).sample_sigmas(model.model.model_sampling, _batch(500, 16, width, height),
                                            torch.Generator().manual_seed(4), settings)
        torch.testing.assert_close(sigma, math.exp(1.15) * t / (1 + (math.exp(1.15) - 1) * t))
    patched = ModelSamplingAuraFlow().patch_aura(model, 3.1)[0]
    ms = patched.get_model_object("model_sampling")
    sigma = detect(patched).sample_sigmas(ms, _batch(500, 16), torch.Generator().manual_seed(4), settings)
    torch.testing.assert_close(sigma, ms.sigma(t), rtol=1e-5, atol=1e-6)      # (AuraFlow: multiplier 1)
    torch.testing.assert_close(sigma, 3.1 * t / (1 + 2.1 * t))


def test_qwen_image_resolution_shift_is_its_own_schedulers_not_fluxs(tiny):
    """resolution_shift (ai-toolkit's timestep_type shift) on Qwen-Image: diffusers' Qwen-Image scheduler, μ linear
    in the 2x2 latent patches from 0.5 at 256 to 0.9 at 8192 (α = 2.0 at 1024²; Flux's would be e^1.15)."""
    model = tiny.tiny_model("qwen_image")
    settings = TrainingSettings(timestep_sampling="uniform", resolution_shift=True)
    t = torch.rand(200, generator=torch.Generator().manual_seed(4))
    for (width, height), mu in (((256, 256), 0.5), ((1024, 1024), 0.5 + 0.4 * 3840 / 7936),
                                ((1024, 2048), 0.9)):
        sigma = detect(model).sample_sigmas(model.model.model_sampling, _batch(200, 16, width, height),
                                            torch.Generator().manual_seed(4), settings)
        torch.testing.assert_close(sigma, math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t))


def test_qwen_image_predicts_what_comfyuis_sampling_computes_from_its_conditioning(tiny):
    """The context alone (c_crossattn, as CLIPTextEncode gives Qwen-Image's), on the model's one-frame latents
    (B, 16, 1, h, w); captions of different lengths in one batch give what each gives alone (ComfyUI runs each
    conditioning by itself)."""
    from eridiffusion.trainers.arch import latents_in
    from eridiffusion.trainers.cache import TextEmbedding
    model = tiny.tiny_model("qwen_image")
    base, ms = model.model, model.model.model_sampling
    gen = torch.Generator().manual_seed(5)
    vae_latents = torch.randn(2, 16, 1, 8, 8, generator=gen)
    x = latents_in(base, vae_latents)
    torch.testing.assert_close(x, base.latent_format.process_in(vae_latents).squeeze(2))
    contexts = [torch.randn(7, 64, generator=gen), torch.randn(5, 64, generator=gen)]
    sigma = torch.tensor([0.3, 0.8])
    conds = [base.extra_conds(cross_attn=c.unsqueeze(0), pooled_output=None, noise=x[:1].unsqueeze(2))
             for c in contexts]
    assert all(set(c) == {"c_crossattn"} for c in conds)
    conds = [{k: v.process_cond(batch_size=1, area=None, device="cpu").cond for k, v in c.items()} for c in conds]
    with torch.no_grad():
        for lengths in ([0, 0], [0, 1]):
            batch = Batch(x, [TextEmbedding(contexts[i], torch.zeros(0)) for i in lengths], _items(2))
            ours = detect(model).predict(base, ms, x, sigma, batch, TrainingSettings())
            assert ours.shape == x.shape
            comfy_denoised = torch.cat([base.apply_model(x[j:j + 1].unsqueeze(2), sigma[j:j + 1], **conds[i])
                                        for j, i in enumerate(lengths)])
            torch.testing.assert_close(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), ours, x).unsqueeze(2),
                                       comfy_denoised, rtol=1e-5, atol=1e-5)


def test_flux2_is_detected_as_flux2_and_flux_takes_only_flux_1(tiny):
    from eridiffusion.trainers.arch import ARCHITECTURES
    flux2, flux = tiny.tiny_model("flux2").model, tiny.tiny_model("flux").model
    assert [a.name for a in ARCHITECTURES.values() if a.matches(flux2)] == ["flux2"]
    assert [a.name for a in ARCHITECTURES.values() if a.matches(flux)] == ["flux"]


@pytest.mark.parametrize("lengths", [(7, 7), (7, 30)], ids=["same", "different"])
def test_flux2_predicts_what_comfyuis_sampling_computes_from_its_conditioning(tiny, lengths):
    """The Mistral context padded at the front to 512 tokens (Flux2.extra_conds) and the guidance input, as a
    sampler after FluxGuidance gives them; each caption of a batch as ComfyUI computes it alone."""
    from eridiffusion.trainers.cache import TextEmbedding
    model = tiny.tiny_model("flux2")
    base, ms = model.model, model.model.model_sampling
    gen = torch.Generator().manual_seed(5)
    contexts = [torch.randn(n, 48, generator=gen) for n in lengths]
    x = torch.randn(2, 128, 8, 8, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    batch = Batch(x, [TextEmbedding(c, torch.zeros(0)) for c in contexts], _items(2))
    with torch.no_grad():
        ours = detect(model).predict(base, ms, x, sigma, batch, TrainingSettings(flux_guidance=2.5))
    for i, context in enumerate(contexts):
        # CLIPTextEncode's conditioning from the Mistral encoder: no pooled output; FluxGuidance's guidance
        conds = base.extra_conds(cross_attn=context.unsqueeze(0), pooled_output=None, guidance=2.5, noise=x[i:i + 1])
        assert set(conds) == {"c_crossattn", "guidance"} and conds["c_crossattn"].cond.shape[1] == 512
        conds = {k: v.process_cond(batch_size=1, area=None, device="cpu").cond for k, v in conds.items()}
        with torch.no_grad():
            comfy_denoised = base.apply_model(x[i:i + 1], sigma[i:i + 1], **conds)
        torch.testing.assert_close(ms.calculate_denoised(sigma[i:i + 1].view(-1, 1, 1, 1), ours[i:i + 1], x[i:i + 1]),
                                   comfy_denoised)


def test_zimage_shifts_by_its_models_shift_3_at_every_resolution(tiny):
    """ComfyUI samples Z-Image with ModelSamplingDiscreteFlow at shift 3.0 (multiplier 1), whatever the size."""
    model = tiny.tiny_model("zimage")
    ms = model.model.model_sampling
    assert (ms.shift, ms.multiplier) == (3.0, 1.0)
    settings = TrainingSettings(timestep_sampling="uniform")
    for width, height in ((1024, 1024), (256, 256)):
        sigma = detect(model).sample_sigmas(ms, _batch(500, 16, width, height), torch.Generator().manual_seed(4),
                                            settings)
        t = torch.rand(500, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(sigma, ms.sigma(t), rtol=1e-5, atol=1e-6)    # ComfyUI's schedule at t
    torch.testing.assert_close(sigma, 3.0 * t / (1 + 2.0 * t))


def _zimage_conds(base, clip, text, x):
    """What a sampler passes the model for CLIPTextEncode's conditioning of `text` (attention mask included)."""
    import nodes
    [[context, extra]] = nodes.CLIPTextEncode().encode(clip, text)[0]
    conds = base.extra_conds(cross_attn=context, noise=x, **extra)
    return context[0], {k: v.process_cond(batch_size=x.shape[0], area=None, device="cpu").cond
                        for k, v in conds.items()}


def test_zimage_predicts_what_comfyuis_sampling_computes_from_its_conditioning(tiny):
    """The Qwen3 context as CLIPTextEncode gives it, with extra_conds' num_tokens (its unpadded prompt's mask is
    all ones, so no attention_mask), and NextDiT's own 1 - t: denoised as ComfyUI's apply_model denoises."""
    from eridiffusion.trainers.cache import TextEmbedding
    model, clip = tiny.tiny_model("zimage"), tiny.tiny_clip("zimage")
    base, ms = model.model, model.model.model_sampling
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        context, conds = _zimage_conds(base, clip, "a photo of a red square", x)
        assert set(conds) == {"c_crossattn", "num_tokens"} and conds["num_tokens"] == context.shape[0]
        batch = Batch(x, [TextEmbedding(context, torch.zeros(0))] * 2, _items(2))
        ours = detect(model).predict(base, ms, x, sigma, batch, TrainingSettings())
        comfy_denoised = base.apply_model(x, sigma, **conds)
        # the timestep really is σ (NextDiT turns it into 1 - σ): 1 - σ would predict something else
        flipped = detect(model).predict(base, ms, x, 1 - sigma, batch, TrainingSettings())
    torch.testing.assert_close(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), ours, x), comfy_denoised)
    assert not torch.allclose(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), flipped, x), comfy_denoised, atol=1e-3)


def test_zimage_captions_of_different_lengths_predict_as_comfyui_runs_each_alone(tiny):
    """ComfyUI never pads or repeats a Z-Image caption to batch it with a longer one; each sample of a
    micro-batch is what ComfyUI's apply_model gives for it alone."""
    from eridiffusion.trainers.cache import TextEmbedding
    model, clip = tiny.tiny_model("zimage"), tiny.tiny_clip("zimage")
    base, ms = model.model, model.model.model_sampling
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.4, 0.7])
    with torch.no_grad():
        short, short_conds = _zimage_conds(base, clip, "red", x[:1])
        long, long_conds = _zimage_conds(base, clip, "a large red square on a blue background", x[1:])
        assert short.shape[0] != long.shape[0]
        batch = Batch(x, [TextEmbedding(short, torch.zeros(0)), TextEmbedding(long, torch.zeros(0))], _items(2))
        ours = detect(model).predict(base, ms, x, sigma, batch, TrainingSettings())
        expected = torch.cat([base.apply_model(x[:1], sigma[:1], **short_conds),
                              base.apply_model(x[1:], sigma[1:], **long_conds)])
    torch.testing.assert_close(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), ours, x), expected)


def test_an_explicit_timestep_shift_overrides_the_models(tiny):
    model = tiny.tiny_model("flux")
    sigma = detect(model).sample_sigmas(model.model.model_sampling, _batch(6, 16), torch.Generator().manual_seed(2),
                                        TrainingSettings(timestep_sampling="uniform", timestep_shift=2.0))
    t = torch.rand(6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sigma, 2 * t / (1 + t))


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_flow_loss_weightings_follow_the_sd3_paper(tiny, weighting):
    model = tiny.tiny_model("sd3")
    sigma = torch.tensor([0.1, 0.5, 0.9])
    w = detect(model).loss_weight(model.model.model_sampling, sigma, TrainingSettings(loss_weighting=weighting))
    expected = sigma ** -2 if weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    torch.testing.assert_close(w, expected)


def test_flux_dev_gets_the_guidance_setting_as_its_guidance_input(tiny, monkeypatch):
    from eridiffusion.trainers.cache import TextEmbedding
    model = tiny.tiny_model("flux")
    dm = model.model.diffusion_model
    seen = []
    forward = dm.forward
    monkeypatch.setattr(dm, "forward", lambda *a, **kw: seen.append(kw["guidance"]) or forward(*a, **kw))
    text = TextEmbedding(torch.randn(256, 64), torch.randn(32))
    batch = Batch(torch.randn(2, 16, 8, 8), [text, text], _items(2))
    with torch.no_grad():
        detect(model).predict(model.model, model.model.model_sampling, torch.randn(2, 16, 8, 8),
                              torch.tensor([0.2, 0.7]), batch, TrainingSettings(flux_guidance=2.5))
    torch.testing.assert_close(seen[0], torch.tensor([2.5, 2.5]))


def test_sdxl_size_conditioning_comes_from_each_images_size_crop_and_bucket(tiny, monkeypatch):
    from eridiffusion.trainers.cache import TextEmbedding
    model = tiny.tiny_model("sdxl")
    seen = []
    encode_adm = model.model.encode_adm
    monkeypatch.setattr(model.model, "encode_adm", lambda **kw: seen.append(kw) or encode_adm(**kw))
    items = [DatasetItem("a.png", "a", 1, False, (900, 600), Bucket(64, 64), (3, 0), "h1"),
             DatasetItem("b.png", "b", 1, False, (640, 1280), Bucket(64, 64), (0, 7), "h2")]
    text = TextEmbedding(torch.randn(77, 64), torch.randn(32))
    batch = Batch(torch.randn(2, 4, 8, 8), [text, text], items)
    with torch.no_grad():
        detect(model).predict(model.model, model.model.model_sampling, torch.randn(2, 4, 8, 8),
                              torch.tensor([1.0, 2.0]), batch, TrainingSettings())
    assert [(k["width"], k["height"], k["crop_w"], k["crop_h"], k["target_width"], k["target_height"])
            for k in seen] == [(900, 600, 3, 0, 64, 64), (640, 1280, 0, 7, 64, 64)]
