"""SDXL's own objective: DDPM noise and timesteps, and the target ComfyUI's model_sampling implies."""
import pytest
import torch

from eridiffusion.trainers.arch import detect


@pytest.mark.parametrize("arch", ["sdxl", "sdxl_v"])
def test_a_model_that_outputs_the_training_target_denoises_exactly(tiny, arch):
    # ComfyUI samples with calculate_denoised(sigma, model_output, x_noisy): if the model outputs our
    # training target (eps, or v for v-prediction models), that must give back the clean latent.
    model = tiny.tiny_model(arch)
    eri_arch, ms = detect(model), model.model.model_sampling
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    sigma = eri_arch.sample_sigmas(ms, 3, gen)
    x_noisy = eri_arch.noisy(ms, x0, noise, sigma)
    target = eri_arch.target(model.model, x0, noise, sigma)
    denoised = ms.calculate_denoised(sigma.view(-1, 1, 1, 1), target, x_noisy)
    torch.testing.assert_close(denoised, x0, rtol=1e-4, atol=1e-4)


def test_timesteps_cover_the_1000_ddpm_steps_uniformly(tiny):
    model = tiny.tiny_model("sdxl")
    ms = model.model.model_sampling
    sigma = detect(model).sample_sigmas(ms, 20000, torch.Generator().manual_seed(0))
    t = ms.timestep(sigma)
    assert t.min() == 0 and t.max() == 999
    assert abs(t.float().mean().item() - 499.5) < 10


def test_min_snr_weight_caps_the_weight_of_low_noise_steps(tiny):
    model = tiny.tiny_model("sdxl")
    arch = detect(model)
    sigma = torch.tensor([0.03, 1.0, 10.0])
    w = arch.loss_weight(model.model, sigma, 5.0)
    snr = 1 / sigma ** 2
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr)
    assert torch.equal(arch.loss_weight(model.model, sigma, 0.0), torch.ones(3))


def test_sdxl_size_conditioning_comes_from_each_images_size_crop_and_bucket(tiny, monkeypatch):
    from eridiffusion.trainers.arch import Batch
    from eridiffusion.trainers.cache import TextEmbedding
    from eridiffusion.trainers.data import Bucket, DatasetItem
    model = tiny.tiny_model("sdxl")
    seen = []
    encode_adm = model.model.encode_adm
    monkeypatch.setattr(model.model, "encode_adm", lambda **kw: seen.append(kw) or encode_adm(**kw))
    items = [DatasetItem("a.png", "a", 1, False, (900, 600), Bucket(64, 64), (3, 0), "h1"),
             DatasetItem("b.png", "b", 1, False, (640, 1280), Bucket(64, 64), (0, 7), "h2")]
    text = TextEmbedding(torch.randn(77, 64), torch.randn(32))
    batch = Batch(torch.randn(2, 4, 8, 8), [text, text], items)
    with torch.no_grad():
        detect(model).predict(model.model, torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), batch)
    assert [(k["width"], k["height"], k["crop_w"], k["crop_h"], k["target_width"], k["target_height"])
            for k in seen] == [(900, 600, 3, 0, 64, 64), (640, 1280, 0, 7, 64, 64)]
