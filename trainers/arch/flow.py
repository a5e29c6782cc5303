"""Rectified flow, the objective SD 3.5 and Flux share (ComfyUI's CONST model sampling):

    x_t = (1 - σ)·x0 + σ·ε,   the model predicts ε - x0,   ComfyUI denoises with x0 = x_t - σ·prediction.

Training draws t in (0, 1) (uniform, logit-normal or sigmoid) and shifts it the way the model's sampler
does, σ = α·t / (1 + (α - 1)·t), so training spends its steps where sampling spends them.
"""
from __future__ import annotations

import math

import torch

import comfy.model_sampling

from .base import Architecture, sample_unit_times


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
        return settings.timestep_shift or model_shift(model_sampling)

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
        if settings.loss_weighting == "sigma_sqrt":
            return sigma.clamp(min=1e-4) ** -2.0
        if settings.loss_weighting == "cosmap":
            return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma * sigma))
        return torch.ones_like(sigma)

    def noise_levels(self, model_sampling, sigma):
        # x_t = (1-σ)·x0 + σ·ε: the schedule runs over σ itself (kohya's timesteps are σ·1000)
        return sigma, sigma / (1.0 - sigma)
