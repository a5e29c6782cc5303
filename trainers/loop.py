"""The training loop: read it top to bottom.

    data order -> micro-batch -> noise, timesteps -> noisy latents -> predict -> native target -> weighted
    MSE -> backward (accumulated) -> clip -> learning rate -> optimizer step

Everything architecture-specific is asked of `trainers.arch`; everything method-specific of
`trainers.adapters`. Training runs on a clone of the MODEL with the adapter (and gradient checkpointing)
installed as object patches, so the MODEL that came in is never changed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint

import comfy.model_management

from . import arch as arches
from .adapters.base import install
from .cache import LatentSet, TextSet
from .config import ConfigError, TrainingSettings
from .optim import learning_rate, make_optimizer
from .state import AdapterState, build_layers, cpu_copy

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the step and what to change."""


@dataclass(frozen=True)
class StepReport:
    step: int            # optimizer steps done, counting earlier runs
    total: int           # step this run ends at
    loss: float
    learning_rate: float
    seconds: float       # wall time of this step


class CheckpointedForward:
    """Object patch for a block's forward: recompute its activations in backward (non-reentrant)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return type(self.module).forward(self.module, *args, **kwargs)
        # No RNG state to preserve (the diffusion models run without dropout) and no metadata check on
        # recompute: both cost host time per block, and SDXL at batch 1 is bound by host time.
        return torch.utils.checkpoint.checkpoint(type(self.module).forward, self.module, *args,
                                                 use_reentrant=False, preserve_rng_state=False,
                                                 determinism_check="none", **kwargs)


class DataOrder:
    """Same-bucket batches in an order that depends only on (seed, epoch): a position in it is one int."""

    def __init__(self, latents: LatentSet, batch_size: int, seed: int):
        self.seed = seed
        self.batch_size = batch_size
        by_bucket: dict = {}
        for index, item in enumerate(latents.dataset.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        self.groups = [by_bucket[b] for b in sorted(by_bucket, key=lambda b: (b.width, b.height))]
        self.batches_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)
        self._epoch, self._batches = None, None

    def batch(self, cursor: int) -> list[int]:
        epoch, position = divmod(cursor, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[position]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for group in self.groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


class TrainingRun:
    """Continues training `state` on `patcher`'s model. `step()` does one optimizer step; `export()` gives
    the new AdapterState. Nothing passed in is modified."""

    def __init__(self, patcher, state: AdapterState, latents: LatentSet, text: TextSet,
                 settings: TrainingSettings, end_step: int):
        self.arch = arches.detect(patcher)
        if state.spec.arch != self.arch.name:
            raise ConfigError(f"the adapter was made for {state.spec.arch} but the MODEL is {self.arch.name}: "
                              f"create the adapter from this MODEL")
        self.state, self.latents, self.text, self.settings = state, latents, text, settings
        self.end_step = end_step   # the step this run is asked to reach (reported with every step)
        self.schedule_steps = settings.total_steps or end_step
        self.base_model = patcher.model
        self.patcher = patcher.clone()
        self.device = self.patcher.load_device
        self.layers = build_layers(state, self.device, trainable=True)
        install(self.patcher, self.layers)
        if settings.gradient_checkpointing:
            root = self.base_model.diffusion_model
            for path in self.arch.checkpoint_modules(root):
                self.patcher.add_object_patch(f"diffusion_model.{path}.forward",
                                              CheckpointedForward(root.get_submodule(path)))
        # The base weights never train; ComfyUI's inference never needs their gradients either.
        self.base_model.diffusion_model.requires_grad_(False)
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)

        self.params = [p for layer in self.layers.values() for p in layer.parameters()]
        self.optimizer = make_optimizer(self.params, settings, self.device)
        if state.optimizer is not None and state.optimizer_name == settings.optimizer:
            self.optimizer.load_state_dict(cpu_copy(state.optimizer))
        self.generator = torch.Generator()
        if state.rng is not None:
            self.generator.set_state(state.rng.clone())
        else:
            self.generator.manual_seed(settings.seed)
        self.order = DataOrder(latents, settings.batch_size, settings.seed)
        self.scaler = torch.amp.GradScaler(self.device.type) if settings.precision == "fp16" else None
        self.step_count, self.cursor = state.step, state.cursor
        self.losses, self.lrs, self.steps = [], [], []

    # ---------------------------------------------------------------------------------------- one step
    def _micro_batch(self):
        indices = self.order.batch(self.cursor)
        self.cursor += 1
        items = [self.latents.dataset.items[i] for i in indices]
        x0 = self.base_model.latent_format.process_in(torch.stack([self.latents.latents[i] for i in indices]))
        gen, s = self.generator, self.settings
        contexts = []
        for item in items:
            dropped = s.caption_dropout > 0 and torch.rand((), generator=gen).item() < s.caption_dropout
            contexts.append(self.text.get("" if dropped else item.caption))
        noise = torch.randn(x0.shape, generator=gen)
        if s.noise_offset:
            noise = noise + s.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        sigma = self.arch.sample_sigmas(self.base_model.model_sampling, len(indices), gen)
        batch = arches.Batch(x0.to(self.device), contexts, items)
        return batch, noise.to(self.device), sigma.to(self.device)

    def _loss(self, batch, noise, sigma) -> torch.Tensor:
        ms = self.base_model.model_sampling
        x_noisy = self.arch.noisy(ms, batch.latents, noise, sigma)
        autocast = AUTOCAST.get(self.settings.precision)
        with torch.autocast(self.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            prediction = self.arch.predict(self.base_model, x_noisy, sigma, batch)
        target = self.arch.target(self.base_model, batch.latents, noise, sigma)
        per_sample = (prediction.float() - target.float()).square().mean(dim=tuple(range(1, target.ndim)))
        weight = self.arch.loss_weight(self.base_model, sigma, self.settings.min_snr_gamma)
        return (per_sample * weight).mean()

    def step(self) -> StepReport:
        started = time.perf_counter()
        accumulation = self.settings.grad_accumulation
        total = 0.0
        for _ in range(accumulation):
            loss = self._loss(*self._micro_batch())
            value = loss.item()
            if value != value or value in (float("inf"), float("-inf")):
                raise TrainingError(f"the loss became {value} at step {self.step_count + 1}: lower the learning "
                                    f"rate, use precision bf16 or fp32, or set max_grad_norm")
            total += value / accumulation
            scaled = loss / accumulation
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        lr = learning_rate(self.settings, self.step_count, self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.steps.append(self.step_count)
        self.losses.append(total)
        self.lrs.append(lr)
        return StepReport(self.step_count, self.end_step, total, lr, time.perf_counter() - started)

    def export(self) -> AdapterState:
        from .adapters import method
        return self.state.replace(
            weights=method(self.state.spec.kind).layer_weights(self.layers),
            step=self.step_count, cursor=self.cursor,
            optimizer=cpu_copy(self.optimizer.state_dict()), optimizer_name=self.settings.optimizer,
            rng=self.generator.get_state().clone(),
            history=self.state.history.extended(self.steps, self.losses, self.lrs),
            settings=self.settings.to_dict())


def train(patcher, state: AdapterState, latents: LatentSet, text: TextSet, settings: TrainingSettings,
          steps: int, on_step: Callable[[StepReport], None] | None = None) -> AdapterState:
    """Train `steps` optimizer steps and return the new state. `on_step` may raise to stop (Cancel)."""
    with torch.inference_mode(False), torch.enable_grad():
        run = TrainingRun(patcher, state, latents, text, settings, end_step=state.step + steps)
        for _ in range(steps):
            report = run.step()
            if on_step:
                on_step(report)
        return run.export()
