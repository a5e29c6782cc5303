"""Validation loss: a held-out set evaluated every N steps at fixed timesteps and noise, without touching training."""
import dataclasses

import numpy as np
import pytest
import torch

from helpers import prepared, run, settings


@pytest.fixture
def p(request, comfy_folders, tiny):
    """A training set and a held-out set (other images) with their own caches; SDXL unless parametrized."""
    from conftest import write_images
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents, EriTrainingImages
    p = prepared(comfy_folders, tiny, arch=getattr(request, "param", "sdxl"))
    write_images(comfy_folders["input"] / "held_out", ((64, 64), (64, 64), (128, 64)), seed=3, prefix="val")
    held_out = run(EriTrainingImages, folder="held_out", resolution=64, trigger_word="", default_caption="",
                   flip=False, min_side=64, max_side=128, max_upscale=1.0)[0]
    p["val_latents"] = run(EriCacheLatents, dataset=held_out, vae=p["vae"], batch_size=4)[0]
    p["val_captions"] = run(EriCacheCaptions, dataset=held_out, clip=p["clip"])[0]
    return p


def train_with(p, steps, every=None, adapter=None, node=None, **overrides):
    from eridiffusion.nodes.train import EriTrainSteps
    validation = {} if every is None else dict(validation_latents=p["val_latents"],
                                               validation_captions=p["val_captions"], validation_every=every)
    with torch.inference_mode():
        return (node or EriTrainSteps).execute(
            model=p["model"], adapter=adapter or p["adapter"], latents=p["latents"], captions=p["captions"],
            settings=settings(**overrides), steps=steps, **validation).result[:3]


@pytest.mark.parametrize("p, checkpointing", [("sdxl", False), ("sdxl", True), ("sd3", False), ("flux", True)],
                         indirect=["p"])
def test_training_is_bit_identical_with_and_without_validation(p, checkpointing):
    _, with_validation, _ = train_with(p, 5, every=1, gradient_checkpointing=checkpointing)
    _, without, _ = train_with(p, 5, gradient_checkpointing=checkpointing)
    assert with_validation.history.losses == without.history.losses
    assert all(torch.equal(with_validation.weights[k], without.weights[k]) for k in without.weights)
    assert with_validation.rng.equal(without.rng) and with_validation.cursor == without.cursor
    assert with_validation.history.val_steps == (1, 2, 3, 4, 5) and without.history.val_steps == ()


def test_the_validation_loss_is_evaluated_every_n_steps_and_after_the_last_and_is_the_same_in_two_runs(p):
    _, first, loss = train_with(p, 7, every=3)
    _, second, _ = train_with(p, 7, every=3)
    assert loss.val_steps == (3, 6, 7)
    assert first.history.val_losses == second.history.val_losses
    assert all(np.isfinite(loss.val_losses)) and len(set(loss.val_losses)) == 3, "it follows the training"


def validation_loss(p, adapter, latents, seed=0):
    from eridiffusion.trainers.loop import TrainingRun, Validation
    with torch.inference_mode(False):
        training = TrainingRun(p["model"], adapter, p["latents"], p["captions"], settings(seed=seed), end_step=1)
        return training.validation_loss(Validation(latents, p["val_captions"], 1))


def test_the_validation_loss_does_not_depend_on_the_held_out_images_order_or_the_training_seed(p):
    _, trained, _ = train_with(p, 3)
    latents = p["val_latents"]
    reordered = dataclasses.replace(latents, dataset=dataclasses.replace(
        latents.dataset, items=latents.dataset.items[::-1]), latents=latents.latents[::-1])
    value = validation_loss(p, trained, latents)
    assert validation_loss(p, trained, reordered) == value
    assert validation_loss(p, trained, latents, seed=12345) == value
    assert validation_loss(p, p["adapter"], latents) != value, "the adapter's weights change it"


def test_the_step_event_carries_the_validation_loss_on_the_steps_it_is_evaluated(p, monkeypatch):
    from eridiffusion.nodes import live
    events, real_step = [], live.LiveRun.step
    monkeypatch.setattr(live.LiveRun, "step", lambda self, report: events.append(real_step(self, report)) or events[-1])
    from test_live_view import train_node
    _, _, loss = train_with(p, 4, every=2, node=train_node("9", "wf-val"))
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert ["val_loss" in e for e in events] == [False, True, False, True]
    assert [e["val_loss"] for e in events if "val_loss" in e] == list(loss.val_losses)
    h = live.history("9", "wf-val")
    assert h["val_steps"] == [2, 4] and h["val_losses"] == list(loss.val_losses)


def test_validation_needs_both_latents_and_captions(p):
    from eridiffusion.nodes.train import EriTrainSteps
    from eridiffusion.trainers.config import ConfigError
    with pytest.raises(ConfigError, match="validation_latents and validation_captions go together"), \
            torch.inference_mode():
        EriTrainSteps.execute(model=p["model"], adapter=p["adapter"], latents=p["latents"], captions=p["captions"],
                              settings=settings(), steps=1, validation_latents=p["val_latents"])


def test_the_validation_history_survives_a_save_and_load_and_the_loss_graph_draws_it(p, comfy_folders):
    from eridiffusion.nodes.adapter import EriLoadAdapter, EriSaveAdapter
    from eridiffusion.nodes.train import EriLossGraph
    from eridiffusion.trainers.plot import VALIDATION_COLOUR
    _, trained, loss = train_with(p, 4, every=2)
    name = run(EriSaveAdapter, adapter=trained, filename_prefix="val", save_dtype="fp16")[0]
    loaded = run(EriLoadAdapter, lora_name=name)[0]
    assert loaded.history == trained.history
    image = (run(EriLossGraph, loss=loss, smoothing=0.9)[0][0] * 255).round().to(torch.uint8)
    plain = (run(EriLossGraph, loss=dataclasses.replace(loss, val_steps=(), val_losses=()), smoothing=0.9)[0][0]
             * 255).round().to(torch.uint8)
    orange = lambda img: int((img == torch.tensor(VALIDATION_COLOUR, dtype=torch.uint8)).all(-1).sum())  # noqa: E731
    assert orange(image) > 20 and orange(plain) == 0
