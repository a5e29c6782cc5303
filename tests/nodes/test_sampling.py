"""Sampling during training, in-process: what a user sees is what the stock KSampler gives on the trained
MODEL, saved with step and seed in the name, and training is exactly the same with or without it."""
import json
import re

import pytest
import torch
from PIL import Image

import node_helpers
import nodes as comfy_nodes
from helpers import prepared, run, settings


@pytest.fixture
def p(comfy_folders, tiny):
    return prepared(comfy_folders, tiny)


def sampling(p, **overrides):
    from eridiffusion.nodes.sample import EriSamplingSettings
    values = dict(vae=p["vae"], prompts="a red square\na blue circle", negative_prompt="blurry", every_n_steps=2,
                  seed=5, seed_mode="fixed", width=64, height=64, sampler_name="euler", scheduler="normal",
                  steps=2, cfg=3.0, guidance=3.5, filename_prefix="eri_samples/t", clip=p["clip"])
    values.update(overrides)
    return run(EriSamplingSettings, **values)[0]


def train(p, steps, sampling_settings=None, adapter=None, **setting_overrides):
    from eridiffusion.nodes.train import EriTrainSteps
    with torch.inference_mode():
        out = EriTrainSteps.execute(model=p["model"], adapter=adapter or p["adapter"], latents=p["latents"],
                                    captions=p["captions"], settings=settings(**setting_overrides), steps=steps,
                                    sampling=sampling_settings)
    return (*out.result[:4], out.ui)


def test_sampling_every_2_steps_leaves_training_bit_identical_and_saves_step_and_seed_in_names(p, comfy_folders):
    _, plain, plain_history, no_images, no_ui = train(p, 5, batch_size=2, caption_dropout=0.3, noise_offset=0.05)
    _, sampled, history, images, shown = train(p, 5, sampling(p, seed_mode="walk"), batch_size=2,
                                               caption_dropout=0.3, noise_offset=0.05)
    assert history.losses == plain_history.losses
    assert all(torch.equal(sampled.weights[k], plain.weights[k]) for k in plain.weights)
    assert torch.equal(sampled.rng, plain.rng) and sampled.cursor == plain.cursor
    assert no_images.shape[0] == 0 and no_ui is None

    # steps 2 and 4 (every 2) and 5 (the node's last step), two prompts each
    assert images.shape == (6, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    # the node shows captioned previews (temp); the files it saved under output/ are listed in eri_samples
    assert [r["type"] for r in shown["images"]] == ["temp"] * 6
    assert [r["filename"].split("_0000")[0] for r in shown["images"][:2]] == ["eri_preview_step000002_p0",
                                                                            "eri_preview_step000002_p1"]
    names = [r["filename"] for r in shown["eri_samples"]]
    found = [re.fullmatch(r"t_step(\d{6})_seed(\d+)_p(\d)_\d{5}_\.png", n).groups() for n in names]
    # walking seed: round k (up to step 2k) uses seed + k; the step-5 sample belongs to round 3
    assert found == [("000002", "6", "0"), ("000002", "6", "1"), ("000004", "7", "0"), ("000004", "7", "1"),
                     ("000005", "8", "0"), ("000005", "8", "1")]
    for record, image in zip(shown["eri_samples"], images):
        assert record["type"] == "output" and record["subfolder"] == "eri_samples"
        saved = Image.open(comfy_folders["output"] / "eri_samples" / record["filename"])
        assert abs(torch.from_numpy(__import__("numpy").array(saved)).float() / 255 - image).max() <= 1 / 255
        assert json.loads(saved.text["eridiffusion"])["step"] in (2, 4, 5)
    assert not torch.allclose(images[0], images[1]), "two prompts, two images"


def test_a_sample_is_what_the_stock_ksampler_gives_on_the_trained_model_at_that_step(p):
    positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(p["clip"], "")[0]
    keys_before = [dict(extra) for _, extra in positive]
    settings_ = sampling(p, positive=positive, negative=negative, clip=None, every_n_steps=3, seed=11)
    model, _, _, images, _ = train(p, 3, settings_, learning_rate=1e-2)
    assert images.shape[0] == 1
    assert [dict(extra) for _, extra in positive] == keys_before, "the CONDITIONING input is not changed"
    with torch.inference_mode():
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        out = comfy_nodes.common_ksampler(model, 11, 2, 3.0, "euler", "normal", positive, negative, latent)[0]
        stock = p["vae"].decode(out["samples"])
        untrained = comfy_nodes.common_ksampler(p["model"], 11, 2, 3.0, "euler", "normal", positive, negative,
                                                latent)[0]
        untrained = p["vae"].decode(untrained["samples"])
    assert torch.allclose(images[0], stock[0], atol=1e-5)
    assert not torch.allclose(images[0], untrained[0], atol=1e-3), "the sample shows the trained adapter"


def _sample_and_stock(comfy_folders, tiny, arch, guidance):
    """The first sample Train steps takes on `arch` with Sampling settings' `guidance`, and a function giving the
    stock KSampler's image from the trained MODEL, after a FluxGuidance node of the given guidance (or none), on
    an empty latent of the VAE's size (Flux.2's VAE: 1/16, as EmptyFlux2LatentImage makes it)."""
    p = prepared(comfy_folders, tiny, arch=arch)
    positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(p["clip"], "")[0]
    settings_ = sampling(p, positive=positive, negative=negative, clip=None, every_n_steps=3, seed=11,
                         guidance=guidance)
    model, _, _, images, _ = train(p, 3, settings_, learning_rate=1e-2)
    scale = p["vae"].spacial_compression_encode()
    latent = {"samples": torch.zeros([1, model.model.latent_format.latent_channels, 64 // scale, 64 // scale])}

    def stock(flux_guidance):
        conds = [positive, negative] if flux_guidance is None else [
            node_helpers.conditioning_set_values(c, {"guidance": flux_guidance}) for c in (positive, negative)]
        with torch.inference_mode():
            return p["vae"].decode(comfy_nodes.common_ksampler(model, 11, 2, 3.0, "euler", "normal", *conds,
                                                               latent)[0]["samples"])
    return images[0], stock


def test_a_chroma_sample_is_the_stock_ksamplers_without_a_guidance_input(comfy_folders, tiny):
    """Chroma takes ComfyUI's default guidance 0, as it trains: the Flux-dev guidance setting is not applied."""
    image, stock = _sample_and_stock(comfy_folders, tiny, "chroma", 3.5)
    assert torch.allclose(image, stock(None)[0], atol=1e-5)
    assert not torch.allclose(image, stock(3.5)[0], atol=1e-3)


def test_a_flux2_sample_is_the_stock_ksamplers_after_flux_guidance(comfy_folders, tiny):
    """Flux.2-dev takes the guidance input as Flux-dev does (a FluxGuidance node's)."""
    image, stock = _sample_and_stock(comfy_folders, tiny, "flux2", 2.5)
    assert torch.allclose(image, stock(2.5)[0], atol=1e-5)
    assert not torch.allclose(image, stock(None)[0], atol=1e-3)


def test_a_zimage_sample_from_prompts_is_the_stock_ksamplers_from_clip_text_encode(comfy_folders, tiny):
    """Z-Image: prompt and negative (of different lengths) encoded as CLIPTextEncode encodes them, with their
    attention masks and token counts, sampled as KSampler samples the trained MODEL (no guidance input)."""
    p = prepared(comfy_folders, tiny, arch="zimage")
    settings_ = sampling(p, prompts="a red square", negative_prompt="blurry", every_n_steps=3, seed=11)
    model, _, _, images, _ = train(p, 3, settings_, learning_rate=1e-2)
    with torch.inference_mode():
        positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(p["clip"], "blurry")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        stock = p["vae"].decode(comfy_nodes.common_ksampler(model, 11, 2, 3.0, "euler", "normal", positive, negative,
                                                            latent)[0]["samples"])
        untrained = p["vae"].decode(comfy_nodes.common_ksampler(p["model"], 11, 2, 3.0, "euler", "normal", positive,
                                                                negative, latent)[0]["samples"])
    assert torch.allclose(images[0], stock[0], atol=1e-5)
    assert not torch.allclose(images[0], untrained[0], atol=1e-3), "the sample shows the trained adapter"


def test_fixed_seed_samples_every_round_with_the_same_noise_and_chaining_samples_at_the_same_steps(p):
    s = sampling(p, prompts="a red square", every_n_steps=2)
    _, once, _, images, shown = train(p, 4, s)
    _, half, _, first, shown_a = train(p, 2, s)
    _, _, _, second, shown_b = train(p, 2, s, adapter=half)
    names = [r["filename"] for r in shown["eri_samples"]]
    assert [n.split("_0000")[0] for n in names] == ["t_step000002_seed5_p0", "t_step000004_seed5_p0"]
    assert torch.equal(torch.cat([first, second]), images)


def test_sampling_settings_need_a_clip_or_a_conditioning(p):
    from eridiffusion.trainers.config import ConfigError
    with pytest.raises(ConfigError, match="CLIP"):
        sampling(p, clip=None)
    positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
    s = sampling(p, clip=None, positive=positive)
    assert len(s.positives) == 1 and all(torch.count_nonzero(t) == 0 for t, _ in s.negative)


def test_a_prompts_own_size_seed_steps_cfg_and_negative_are_what_the_stock_ksampler_gives_with_them(p, comfy_folders):
    s = sampling(p, prompts="a red square --w 64 --h 128 --d 11 --s 3 --l 2.0 --n dark\na blue circle",
                 every_n_steps=2)
    assert [label for label, _ in s.positives] == ["a red square", "a blue circle"]
    model, _, _, images, shown = train(p, 2, s)
    assert [r["filename"].split("_0000")[0] for r in shown["eri_samples"]] == ["t_step000002_seed11_p0",
                                                                               "t_step000002_seed5_p1"]
    with torch.inference_mode():
        positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(p["clip"], "dark")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(64, 128, 1)[0]
        out = comfy_nodes.common_ksampler(model, 11, 3, 2.0, "euler", "normal", positive, negative, latent)[0]
        stock = p["vae"].decode(out["samples"])[0]
    saved = Image.open(comfy_folders["output"] / "eri_samples" / shown["eri_samples"][0]["filename"])
    assert saved.size == (64, 128)
    assert abs(torch.from_numpy(__import__("numpy").array(saved)).float() / 255 - stock).max() <= 1 / 255
    assert json.loads(saved.text["eridiffusion"])["steps"] == 3 and json.loads(saved.text["eridiffusion"])["cfg"] == 2.0
    # the samples output is one IMAGE batch: a prompt of another size is resized to the first prompt's
    assert images.shape == (2, 128, 64, 3)


@pytest.mark.parametrize("line, words", [
    ("a cat --w 9000", ["line 2", "width", "8192"]),
    ("a cat --x 1", ["line 2", "unknown prompt flag", "--x"]),
    ("a cat --d -1", ["line 2", "seed"]),
    ("a cat --s many", ["line 2", "--s", "whole number"]),
])
def test_a_bad_prompt_flag_is_an_error_naming_the_line(p, line, words):
    from eridiffusion.trainers.config import ConfigError
    with pytest.raises(ConfigError) as e:
        sampling(p, prompts="a dog\n" + line)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_qwen_image_sample_is_the_stock_ksamplers_on_its_wan_latent(comfy_folders, tiny):
    """Qwen-Image samples on a one-frame Wan latent (an empty 4-channel latent made 16 x 1 frame as ComfyUI's
    samplers make it) with CFG and no guidance input, decoded by the Wan VAE: the stock KSampler's image."""
    p = prepared(comfy_folders, tiny, arch="qwen_image")
    positive = comfy_nodes.CLIPTextEncode().encode(p["clip"], "a red square")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(p["clip"], "")[0]
    settings_ = sampling(p, positive=positive, negative=negative, clip=None, every_n_steps=3, seed=11)
    model, _, _, images, _ = train(p, 3, settings_, learning_rate=1e-2)
    with torch.inference_mode():
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        stock = p["vae"].decode(comfy_nodes.common_ksampler(model, 11, 2, 3.0, "euler", "normal", positive, negative,
                                                            latent)[0]["samples"])
        untrained = p["vae"].decode(comfy_nodes.common_ksampler(p["model"], 11, 2, 3.0, "euler", "normal", positive,
                                                                negative, latent)[0]["samples"])
    assert stock.shape == (1, 1, 64, 64, 3) and images[0].shape == (64, 64, 3)
    assert torch.allclose(images[0], stock[0, 0], atol=1e-5)
    assert not torch.allclose(images[0], untrained[0, 0], atol=1e-3), "the sample shows the trained adapter"
