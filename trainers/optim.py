"""Optimizers and learning-rate schedules by name."""
from __future__ import annotations

import math

import torch

from .config import ConfigError, TrainingSettings


def _adamw(params, s: TrainingSettings, device):
    # Fused (one kernel family for every parameter, on CUDA and the CPU alike): it can also skip a step on the
    # device (see skips_on_device), so the training loop need not wait for the GPU before stepping.
    try:
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay, fused=True)
    except (RuntimeError, ValueError):     # a torch or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay, foreach=True)


def _adamw8bit(params, s: TrainingSettings, device):
    try:
        import bitsandbytes as bnb
    except Exception as e:   # ImportError, or a CUDA library that fails to load
        raise ConfigError(f"optimizer adamw8bit needs bitsandbytes, which could not be loaded ({e}). Install it "
                          f"with 'pip install bitsandbytes' or choose optimizer adamw") from e
    return bnb.optim.AdamW8bit(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def _adafactor(params, s: TrainingSettings, device):
    return torch.optim.Adafactor(params, lr=s.learning_rate, weight_decay=s.weight_decay)


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw8bit, "adafactor": _adafactor}


def make_optimizer(params, settings: TrainingSettings, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[settings.optimizer](list(params), settings, device)


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` can take a device tensor `found_inf` and skip the update when it is nonzero
    (torch's fused Adam/AdamW, which GradScaler drives the same way): a NaN step is then skipped without the
    host reading the loss first."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in optimizer.param_groups))


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a state_dict but keep this optimizer's implementation (fused / foreach): a state saved by another
    torch build or device would otherwise bring its own choice along with its hyperparameters."""
    kept = [{k: group.get(k) for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, implementation in zip(optimizer.param_groups, kept):
        group.update(implementation)


def step_skipping_on_device(optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device where found_inf (a float tensor on the parameters' device) is
    nonzero; torch's fused kernels then also leave their step counters as they were."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class OffloadedOptimizer:
    """Steps fp32 copies of the parameters in CPU memory, where the optimizer state also lives: gradients
    are copied down after backward and the new weights copied back. Saves the GPU the optimizer state (and
    fp32 master weights of bf16 adapters) for a copy per step."""

    def __init__(self, params, make):
        self.params = list(params)
        self.masters = [p.detach().to("cpu", torch.float32, copy=True).requires_grad_(True) for p in self.params]
        self.inner = make(self.masters)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @torch.no_grad()
    def step(self):
        for param, master in zip(self.params, self.masters):
            master.grad = None if param.grad is None else param.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for param, master in zip(self.params, self.masters):
            param.copy_(master, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True):
        for param in self.params:
            param.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _constant(progress: float) -> float:
    return 1.0


def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def learning_rate(settings: TrainingSettings, step: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up, then the schedule over the remaining steps."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    decay_steps = max(1, total_steps - settings.warmup_steps)
    progress = (step - settings.warmup_steps) / decay_steps
    return settings.learning_rate * SCHEDULES[settings.schedule](progress)
