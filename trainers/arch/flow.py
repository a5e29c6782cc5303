"""Rectified flow, the objective SD 3.5 and Flux share (ComfyUI's CONST model sampling):

    x_t = (1 - σ)·x0 + σ·ε,   the model predicts ε - x0,   ComfyUI denoises with x0 = x_t - σ·prediction.

Training draws t in (0, 1) (uniform, logit-normal, sigmoid, lognorm_blend) and shifts it the way the model's
sampler does, σ = α·t / (1 + (α - 1)·t), so training spends its steps where sampling spends them (α = 1, no
shift, is what ai-toolkit's sigmoid / linear / weighted / lognorm_blend timesteps use).
"""
from __future__ import annotations

import functools
import math

import torch

import comfy.model_sampling

from .aitk_weights import WEIGHTS
from .base import Architecture, sample_unit_times

# ComfyUI's ModelSamplingFlux node and ai-toolkit's Flux scheduler (toolkit/sampler.py flux_config, shift by
# toolkit/samplers/custom_flowmatch_sampler.py calculate_shift): μ is linear in the number of 2×2 latent
# patches, from 0.5 at 256 to 1.15 at 4096 (1024² pixels); α = e^μ.
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def resolution_shift(width: int, height: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (4096 - 256)
    mu = (width * height / (8 * 8 * 2 * 2)) * slope + (BASE_SHIFT - slope * 256)
    return math.exp(mu)


def model_shift(model_sampling) -> float:
    """α of the model's own sampling: ModelSamplingDiscreteFlow keeps α; ModelSamplingFlux keeps μ = ln α."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux):
        return math.exp(model_sampling.shift)
    return float(model_sampling.shift)


def shifted(t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return alpha * t / (1.0 + (alpha - 1.0) * t)


class RectifiedFlow(Architecture):
    def shift(self, model_sampling, item, settings) -> float:
        """α for one sample (the item's bucket gives its resolution)."""
        if settings.timestep_shift:
            return settings.timestep_shift
        if settings.resolution_shift:
            return resolution_shift(item.bucket.width, item.bucket.height)
        return model_shift(model_sampling)

    def sample_sigmas(self, model_sampling, batch, generator, settings):
        t = sample_unit_times(len(batch.items), generator, settings, "logit_normal")
        alpha = torch.tensor([self.shift(model_sampling, item, settings) for item in batch.items])
        return shifted(t, alpha)

    def noisy(self, model_sampling, x0, noise, sigma):
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - s) * x0 + s * noise

    def target(self, model_sampling, x0, noise, sigma):
        return noise - x0

    def loss_weight(self, model_sampling, sigma, settings):
        # As diffusers' compute_loss_weighting_for_sd3.
        if settings.loss_weighting == "weighted":     # entry i is the timestep 1000 - i
            index = ((1.0 - sigma) * 1000.0).round().long().clamp(0, len(WEIGHTS) - 1)
            return _weights_on(sigma.device)[index].to(sigma.dtype)
        if settings.loss_weighting == "sigma_sqrt":
            return sigma.clamp(min=1e-4) ** -2.0
        if settings.loss_weighting == "cosmap":
            return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma * sigma))
        return torch.ones_like(sigma)

    def noise_levels(self, model_sampling, sigma):
        # x_t = (1-σ)·x0 + σ·ε: the schedule runs over σ itself (kohya's timesteps are σ·1000)
        return sigma, sigma / (1.0 - sigma)


@functools.cache
def _weights_on(device: torch.device) -> torch.Tensor:
    # made once per device, before a CUDA graph is captured (its warm-up steps run first): a captured step
    # must not copy from the host
    return torch.tensor(WEIGHTS, dtype=torch.float32, device=device)
