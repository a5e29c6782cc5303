"""The per-architecture questions the training loop asks. The loop never branches on an architecture name."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One micro-batch, on the training device, already in the model's latent space."""
    latents: torch.Tensor             # x0, (B, C, h, w), scaled by the architecture's latent format
    contexts: list                    # TextEmbedding per sample (after caption dropout)
    items: list                       # DatasetItem per sample


class Architecture:
    name: str = ""
    presets: tuple[str, ...] = ()

    def matches(self, base_model) -> bool:
        raise NotImplementedError

    def target_modules(self, diffusion_model: torch.nn.Module, preset: str) -> list[tuple[str, torch.nn.Module]]:
        raise NotImplementedError

    def checkpoint_modules(self, diffusion_model: torch.nn.Module) -> list[str]:
        """Paths of modules whose forward is recomputed in backward when checkpointing is on."""
        raise NotImplementedError

    def sample_sigmas(self, model_sampling, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, model_sampling, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, base_model, x_noisy: torch.Tensor, sigma: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def target(self, base_model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, base_model, sigma: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        return torch.ones_like(sigma)


def linear_modules(root: torch.nn.Module, keep) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, torch.nn.Linear) and keep(name)]
