"""Sampling while training: images from the adapter as it is at a step, with ComfyUI's own samplers.

A round samples every prompt once with the same seed (so prompts compare with each other; a prompt's own
options, trainers/prompts.py, may change its size, seed, steps, CFG, guidance and negative) on a clone of the
MODEL with the adapter state applied (`state.patched_model`, what Train steps outputs), then decodes with
the VAE. It runs under `torch.no_grad()` with the global RNG saved and restored, and draws its noise from
its own seed: the training run (its generator, its weights, its data order) is untouched by it. Knows
nothing of the server: nodes/ saves the images and shows them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import node_helpers

from .arch import detect
from .config import ConfigError, _help, check_finite, quoted
from .prompts import PromptOptions
from .state import AdapterState, has_text_encoder, patched_clip, patched_model

SEED_MODES = ("fixed", "walk")


@dataclass(frozen=True)
class PromptTexts:
    """What Sampling settings encoded, as text, and the CLIP it encoded them with: the samples of an adapter that
    trains the text encoder encode them again with the adapter's text encoder."""
    clip: object
    positives: tuple          # the text of each positive; None for a CONDITIONING input
    negatives: tuple = ()     # each prompt's own negative text (None: the round's), where options has entries
    negative: str | None = None   # the round's negative text; None: a CONDITIONING input (or none)


def plain_conditioning(conditioning):
    """A copy of a CONDITIONING whose tensors are ordinary (not inference-mode) tensors: sampling runs inside
    the training loop, outside inference mode."""
    with torch.inference_mode(False):
        return [[c.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}]
                for c, extra in conditioning]


def encode_prompt(clip, text: str):
    return plain_conditioning(clip.encode_from_tokens_scheduled(clip.tokenize(text)))


@dataclass(frozen=True)
class SamplingSettings:
    vae: object = _help("Decodes the samples (the VAE of the checkpoint you train on).")
    positives: tuple = _help("(label, CONDITIONING) of each image of a round, in order.")
    negative: object = _help("Negative CONDITIONING shared by all prompts.")
    every_n_steps: int = _help("Sample after every N optimizer steps (counted from the adapter's creation, "
                               "so chained Train steps nodes sample at the same steps as one long node), and "
                               "after the last step of each Train steps node.", default=100)
    seed: int = _help("Noise seed of the samples.", default=42)
    seed_mode: str = _help("fixed: every round uses the seed (watch one image evolve). walk: round k (the "
                           "samples up to step k×N) uses seed + k.", default="fixed")
    width: int = _help("Width of the samples in pixels.", default=1024)
    height: int = _help("Height of the samples in pixels.", default=1024)
    sampler_name: str = _help("ComfyUI sampler.", default="euler")
    scheduler: str = _help("ComfyUI scheduler.", default="normal")
    steps: int = _help("Sampling steps per image.", default=20)
    cfg: float = _help("Classifier-free guidance scale (Flux-dev: 1.0, its guidance is below).", default=7.0)
    guidance: float = _help("Guidance embedded in Flux-dev's / Flux.2-dev's conditioning (schnell and other "
                            "models ignore it).", archs=("flux", "flux2"), default=3.5)
    filename_prefix: str = _help("Samples are saved under ComfyUI's output folder as "
                                 "<prefix>_step<step>_seed<seed>_p<prompt>_<counter>.png.",
                                 default="eri_samples/sample")
    options: tuple = _help("PromptOptions of each positive, in order (its own size, seed, steps, CFG, guidance, "
                           "negative CONDITIONING); empty: every prompt samples with the settings above.",
                           default=())
    texts: PromptTexts | None = _help("The prompts as text and their CLIP, to encode them again with an adapter's "
                                      "text encoder (None: the CONDITIONING above serves every adapter).",
                                      default=None)

    def __post_init__(self):
        check_finite("sampling settings", cfg=self.cfg, guidance=self.guidance)
        if not self.positives:
            raise ConfigError("sampling needs at least one prompt: connect a CLIP and write prompts, or connect "
                              "a positive CONDITIONING")
        if self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be at least 1, got {self.every_n_steps}")
        if self.seed_mode not in SEED_MODES:
            raise ConfigError(f"seed_mode must be one of {', '.join(SEED_MODES)}, got {quoted(self.seed_mode)}")
        if self.sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            raise ConfigError(f"unknown sampler {quoted(self.sampler_name)}")
        if self.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ConfigError(f"unknown scheduler {quoted(self.scheduler)}")
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 64:
            raise ConfigError(f"width and height must be multiples of 8 and at least 64, got {self.width}x{self.height}")
        if self.options and (len(self.options) != len(self.positives)
                             or not all(isinstance(o, PromptOptions) for o in self.options)):
            raise ConfigError(f"options must be one PromptOptions per prompt ({len(self.positives)}), got "
                              f"{len(self.options)}")

    def __repr__(self):
        return (f"SamplingSettings({len(self.positives)} prompts every {self.every_n_steps} steps, "
                f"{self.width}x{self.height}, {self.sampler_name}/{self.scheduler} {self.steps} steps)")

    def round_of(self, step: int) -> int:
        """The round a sample at `step` belongs to: round k ends at step k×N."""
        return -(-step // self.every_n_steps)

    def seed_at(self, step: int, seed: int | None = None) -> int:
        """The noise seed at `step` of a prompt whose own seed is `seed` (None: the round's)."""
        return (self.seed if seed is None else seed) + (self.round_of(step) if self.seed_mode == "walk" else 0)

    def resolved(self, index: int, step: int) -> dict:
        """What prompt `index` samples with at `step`: its own options where it has them, else the round's."""
        o = self.options[index] if self.options else PromptOptions()
        pick = lambda own, default: default if own is None else own  # noqa: E731
        return {"width": pick(o.width, self.width), "height": pick(o.height, self.height),
                "seed": self.seed_at(step, o.seed), "steps": pick(o.steps, self.steps),
                "cfg": pick(o.cfg, self.cfg), "guidance": pick(o.guidance, self.guidance),
                "negative": pick(o.negative, self.negative)}

    def replace(self, **changes) -> "SamplingSettings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Sample:
    step: int
    seed: int
    index: int                 # position of the prompt in the round
    label: str                 # the prompt text, or "conditioning" for a CONDITIONING input
    image: torch.Tensor        # (H, W, 3) floats in [0, 1], ComfyUI's IMAGE layout


def latent_scale(vae) -> int:
    """Image pixels per latent pixel of `vae` (8; Flux.2's VAE 16, whose latents EmptyFlux2LatentImage makes at
    1/16), so that a sample comes out at the size asked for."""
    ratio = vae.spacial_compression_encode()
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def with_guidance(conditioning, guidance: float):
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})


def _check_interrupt(*_):
    comfy.model_management.throw_exception_if_processing_interrupted()


def with_text_encoder(settings: SamplingSettings, state: AdapterState) -> SamplingSettings:
    """`settings` with its prompts encoded by the adapter's text encoder, when the adapter has one and the prompts
    were given as text; otherwise `settings` as they are."""
    texts = settings.texts
    if texts is None or not has_text_encoder(state):
        return settings
    clip = patched_clip(texts.clip, state)
    positives = tuple((label, cond if text is None else encode_prompt(clip, text))
                      for (label, cond), text in zip(settings.positives, texts.positives))
    options = tuple(option if text is None else dataclasses.replace(option, negative=encode_prompt(clip, text))
                    for option, text in zip(settings.options, texts.negatives))
    negative = settings.negative if texts.negative is None else encode_prompt(clip, texts.negative)
    return settings.replace(positives=positives, options=options, negative=negative)


def sample_round(patcher, state: AdapterState, settings: SamplingSettings) -> list[Sample]:
    """One image per prompt of `settings` from `patcher` with `state` applied (its text encoder too, for prompts
    given as text), at step `state.step`."""
    settings = with_text_encoder(settings, state)
    model = patched_model(patcher, state)
    guided = detect(patcher).embedded_guidance
    device = comfy.model_management.get_torch_device()
    rng_devices = [device] if device.type == "cuda" else []
    samples = []
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
        for index, (label, positive) in enumerate(settings.positives):
            r = settings.resolved(index, state.step)
            scale = latent_scale(settings.vae)
            latent = torch.zeros([1, 4, r["height"] // scale, r["width"] // scale],
                                 device=comfy.model_management.intermediate_device())
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = comfy.sample.prepare_noise(latent, r["seed"])
            negative = r["negative"]
            if guided:
                positive, negative = with_guidance(positive, r["guidance"]), with_guidance(negative, r["guidance"])
            out = comfy.sample.sample(model, noise, r["steps"], r["cfg"], settings.sampler_name, settings.scheduler,
                                      positive, negative, latent, callback=_check_interrupt, disable_pbar=True,
                                      seed=r["seed"])
            images = settings.vae.decode(out)
            if images.ndim == 5:                    # video VAEs: (B, T, H, W, C)
                images = images.reshape(-1, *images.shape[-3:])
            samples.append(Sample(state.step, r["seed"], index, label, images[0].float().clamp(0, 1).cpu()))
    return samples
