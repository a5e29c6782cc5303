"""Loss types by name: the per-element error between the model's prediction and its target.

Huber and smooth-L1 are kohya sd-scripts' pseudo-Huber losses with its threshold schedules (huber_c,
huber_schedule, huber_scale; library/train_util.py `get_huber_threshold_if_needed`, `conditional_loss`), so a
setting carried over from kohya trains the same. torch's huber_loss / smooth_l1_loss are piecewise, not these.
"""
from __future__ import annotations

import math

import torch

from .config import TrainingSettings


def huber_threshold(settings: TrainingSettings, share: torch.Tensor, noise_ratio: torch.Tensor) -> torch.Tensor:
    """The pseudo-Huber threshold c per sample. `share` is the timestep as a share of the noise schedule (0 clean
    .. 1 pure noise; kohya's timestep / num_train_timesteps); `noise_ratio` the noise-to-signal ratio of the noisy
    latent (kohya's √((1-ᾱ)/ᾱ), which is ComfyUI's σ of SDXL; σ/(1-σ) for rectified flow, where kohya has none)."""
    c = settings.huber_c
    if settings.huber_schedule == "exponential":
        return torch.exp(math.log(c) * share) * settings.huber_scale
    if settings.huber_schedule == "snr":
        return (1.0 - c) / (1.0 + noise_ratio) ** 2 + c
    return torch.full_like(share, c * settings.huber_scale)


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, settings: TrainingSettings,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element (the caller averages and weights it per sample). `threshold`: huber_threshold's
    c per sample, for huber and smooth_l1."""
    difference = prediction - target
    if settings.loss_type == "mse":
        return difference.square()
    if settings.loss_type == "l1":
        return difference.abs()
    c = threshold.view(-1, *([1] * (difference.ndim - 1))).to(difference.dtype)
    pseudo_huber = torch.sqrt(difference.square() + c * c) - c
    return 2.0 * c * pseudo_huber if settings.loss_type == "huber" else 2.0 * pseudo_huber
