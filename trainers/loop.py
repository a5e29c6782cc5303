"""The training loop: read it top to bottom.

    data order -> micro-batch -> noise, timesteps -> noisy latents -> predict -> native target -> weighted
    loss (MSE, L1, Huber) -> backward (accumulated) -> clip -> learning rate -> optimizer step

With regularisation images (DatasetItem.is_reg), a micro-batch of them follows each micro-batch of training images,
its loss times reg_weight; with differential output preservation, each training micro-batch adds the distance
between the adapter's prediction and the model's own (adapter off) on the caption with the trigger word replaced
by its class word.

Everything architecture-specific is asked of `trainers.arch`; everything method-specific of
`trainers.adapters`. Training runs on a clone of the MODEL with the adapter (and gradient checkpointing)
installed as object patches, so the MODEL that came in is never changed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management

from . import arch as arches
from . import fp8
from . import fused
from . import offload
from .adapters.base import PatchedForward, adapters_off, cast_once, install, object_patch_key
from .arch.base import compute_dtype, to_device
from .blocks import TrainingBlockForward, prime_attention, spread, training_attention
from .cache import LatentSet, TextSet
from .comfy_compat import pinned_memory_disabled, trainable_patcher, training_mode
from .config import ConfigError, TrainingSettings, ignored_settings, quoted
from .graphs import EagerMicroBatches, GraphedMicroBatches
from .losses import elementwise_loss, huber_threshold
from .optim import (OffloadedOptimizer, is_schedule_free, learning_rate, load_optimizer_state, make_optimizer,
                    skips_on_device, state_fits, step_skipped_on_device, step_skipping_on_device,
                    to_evaluation_point, to_training_point)
from .state import AdapterState, build_layers, cpu_copy
from .text_encoder import TextEncoderRun, split_layers

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(settings: TrainingSettings, model_dtype: torch.dtype) -> str:
    """bf16, fp16 or fp32; `auto` is the MODEL's own half precision, so its weights are used as they are
    (ComfyUI loads SDXL in fp16 on most GPUs, SD3 and Flux in bf16). With optimizer_offload, fp16's loss
    scaling is unavailable: bf16."""
    if settings.precision != "auto":
        return settings.precision
    return "fp16" if model_dtype == torch.float16 and not settings.optimizer_offload else "bf16"


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the step and what to change. `state` is the adapter as of
    the last good step (nothing trained before the error is lost), when there is one."""

    def __init__(self, message: str, state: AdapterState | None = None):
        super().__init__(message)
        self.state = state


MAX_CONSECUTIVE_SKIPS = 10
# Replayed graphs' gradients become the parameters' .grad (TrainingRun.adopts_gradients); False: copied (the bench's
# A/B runs)
ADOPT_GRADIENTS = True


@dataclass(frozen=True)
class StepReport:
    step: int            # optimizer steps done, counting earlier runs
    total: int           # step this run ends at
    loss: float
    learning_rate: float
    seconds: float       # wall time of this step
    skipped: bool = False   # NaN/inf loss or gradients: no update (nan_policy skip)
    val_loss: float | None = None   # the held-out set's loss after this step, on the steps it is evaluated
    # the adapter state as of this step, built on demand (a copy to the CPU): for saves every N steps
    export: Callable[[], AdapterState] | None = field(default=None, repr=False, compare=False)


# Mixed into the seeds of the regularisation images' order and randomness, so they are streams of their own.
REG_STREAM = 1 << 62


# Validation evaluates each held-out image at these fractions of the noise schedule (percent_to_sigma: 0 = pure
# noise), each with noise drawn from a generator seeded by the image alone.
VALIDATION_PERCENTS = (0.125, 0.375, 0.625, 0.875)


@dataclass(frozen=True)
class Validation:
    """A held-out set whose loss is evaluated every `every` steps and after a run's last step."""
    latents: LatentSet
    text: TextSet
    every: int

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0


class DeviceRead:
    """Values copied from the device without waiting; read() waits for that copy only, not for the work queued
    on the device after it (step's `ahead`: the next step's micro-batches)."""

    def __init__(self, values: torch.Tensor):
        self.values, self.copied = values, None     # (read() then waits for all the work queued on the device)
        if values.device.type != "cuda" or pinned_memory_disabled():
            return
        try:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        except RuntimeError:     # the system refused to pin (its limit)
            return
        host.copy_(values, non_blocking=True)
        self.values, self.copied = host, torch.cuda.Event()
        self.copied.record()

    def read(self) -> list:
        if self.copied is not None:
            self.copied.synchronize()
        return self.values.tolist()


def _on_host(model_sampling):
    """A copy of a MODEL's sampling object in CPU memory (the object itself where a custom one cannot be copied)."""
    try:
        return copy.deepcopy(model_sampling).to("cpu")
    except Exception:       # noqa: BLE001 (then σ is drawn from the device's table, as before)
        return model_sampling


def _identity(item) -> str:
    """What tells a held-out image from another: its bytes and how it is cropped (not its place in a folder)."""
    return hashlib.sha256(f"{item.content_hash}|{item.bucket}|{item.crop}|{item.flip}".encode()).hexdigest()


class DataOrder:
    """Same-bucket batches in an order that depends only on (seed, epoch): a position in it is one int. The
    training images' order, or (reg) the regularisation images' (DatasetItem.is_reg), a stream of its own."""

    def __init__(self, latents: LatentSet, batch_size: int, seed: int, reg: bool = False):
        self.seed = seed
        self.stream = REG_STREAM if reg else 0
        self.batch_size = batch_size
        by_bucket: dict = {}
        for index, item in enumerate(latents.dataset.items):
            if item.is_reg == reg:
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
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) ^ self.stream)
        batches = []
        for group in self.groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def uses_graphs(settings: TrainingSettings, device: torch.device, text_encoder: bool, streams: bool) -> bool:
    """Whether micro-batches run as CUDA graphs: compile cuda_graphs on a CUDA device, unless the text encoder
    trains (its host work happens inside the micro-batch) or weights stream (memory_budget_gb: the host copies each
    streamed layer's weights as it runs; a replay would reuse the copies made while capturing)."""
    if settings.compile != "cuda_graphs" or torch.device(device).type != "cuda" or text_encoder:
        return False
    if streams:
        logging.info("EriDiffusion: CUDA graphs are off while memory_budget_gb streams weights (the host copies "
                     "each streamed layer's weights as it runs)")
        return False
    return True


class TrainingRun:
    """Continues training `state` on `patcher`'s model. `step()` does one optimizer step; `export()` gives
    the new AdapterState. Nothing passed in is modified."""

    def __init__(self, patcher, state: AdapterState, latents: LatentSet, text: TextSet,
                 settings: TrainingSettings, end_step: int, world=None, clip=None):
        self.arch = arches.detect(patcher)
        if state.spec.arch != self.arch.name:
            raise ConfigError(f"the adapter was made for {state.spec.arch} but the MODEL is {self.arch.name}: "
                              f"create the adapter from this MODEL")
        if latents.controls and not self.arch.reference_latents:
            raise ConfigError(f"the training images have control images (control_folder), which train an edit model "
                              f"(Flux Kontext, Qwen-Image-Edit) on image pairs, but the MODEL is {self.arch.name}: "
                              f"load Flux Kontext or Qwen-Image-Edit, or clear control_folder")
        self.state, self.latents, self.text, self.settings = state, latents, text, settings
        self.end_step = end_step   # the step this run is asked to reach (reported with every step)
        self.schedule_steps = settings.total_steps or end_step
        patcher = trainable_patcher(patcher)
        self.base_model = patcher.model
        self.patcher = patcher.clone()
        # What the MODEL samples with, a ModelSamplingSD3 / Flux node's patch included.
        self.model_sampling = self.patcher.get_model_object("model_sampling")
        # what the host draws σ from (SDXL's table of 1000): reading the device's copy would wait for the GPU
        self.host_sampling = _on_host(self.model_sampling)
        self.device = self.patcher.load_device
        self.layers = build_layers(state, self.device, trainable=True)
        install(self.patcher, self.layers)
        # Text-encoder layers (trainers/text_encoder.py) go on a clone of the CLIP, which encodes every step
        self.model_layers, te_layers = split_layers(self.layers)
        # (fp8_compute for an architecture it does not apply to, SDXL: ignored_settings logs it below)
        if settings.fp8_compute and self.arch.name in TrainingSettings.__dataclass_fields__["fp8_compute"].metadata[
                "archs"]:
            self._install_fp8()
        self.text_encoder = None
        if te_layers:
            if clip is None:
                raise ConfigError("the adapter trains the text encoder (Create adapter's text_encoder): connect the "
                                  "CLIP it was created with to Train steps' clip input")
            self.text_encoder = TextEncoderRun(clip, te_layers, checkpoint=settings.gradient_checkpointing)
            clip.cond_stage_model.requires_grad_(False)
        # memory_budget_gb: the streamed weights of the next block are copied while the current one computes
        self.prefetcher = offload.BlockPrefetcher(self.device) if settings.memory_budget_gb else None
        blocks = []
        if settings.gradient_checkpointing or self.arch.out_of_place_blocks or self.arch.contiguous_block_inputs:
            root = self.base_model.diffusion_model
            paths = self.arch.block_modules(root)
            blocks = [root.get_submodule(path) for path in paths]
            checkpointed = spread(len(paths), settings.checkpoint_fraction if settings.gradient_checkpointing else 0)
            fast = fused.usable_on(self.device)
            for path, checkpoint in zip(paths, checkpointed):
                block = root.get_submodule(path)
                self.patcher.add_object_patch(f"diffusion_model.{path}.forward", TrainingBlockForward(
                    block, checkpoint=checkpoint, out_of_place=self.arch.out_of_place_blocks,
                    keep_attention=not settings.recompute_attention, keep_layers=not settings.recompute_layers,
                    prefetcher=self.prefetcher,
                    forward=self.arch.training_block_forward(block) if fast else None,
                    contiguous_inputs=self.arch.contiguous_block_inputs))
        if fused.usable_on(self.device):
            for path, forward in self.arch.fused_forwards(self.base_model.diffusion_model).items():
                self.patcher.add_object_patch(f"diffusion_model.{path}.forward", forward)
        for line in ignored_settings(settings, self.arch.name, self.arch.unused_settings(self.base_model)):
            logging.warning("EriDiffusion: %s", line)
        # The base weights never train; ComfyUI's inference never needs their gradients either.
        self.base_model.diffusion_model.requires_grad_(False)
        # memory_budget_gb: the bytes of base weights kept on the device (None: all of them); trainers/offload.py
        self.resident = None
        if settings.memory_budget_gb:
            needs = offload.training_needs([p for layer in self.layers.values() for p in layer.parameters()],
                                           settings.optimizer_offload, self.base_model, self._latent_shapes(),
                                           self.arch.activation_factor)
            self.resident = offload.resident_budget(settings.memory_budget_gb, needs, offload.staged_bytes(blocks),
                                                    self.patcher.model_size())
        self.load()
        self.streams = False    # whether ComfyUI streams some of the weights in per layer
        if settings.memory_budget_gb:
            self.streams = offload.log_streaming(self.base_model.diffusion_model, self.resident, needs,
                                                 settings.memory_budget_gb) > 0
            if self.streams and (not settings.gradient_checkpointing or settings.checkpoint_fraction < 1):
                logging.warning("EriDiffusion: memory_budget_gb streams weights, but blocks without gradient "
                                "checkpointing keep their streamed weights on the GPU until backward: turn "
                                "gradient_checkpointing on with checkpoint_fraction 1 for the budget to hold")
            if settings.gradient_checkpointing and not settings.recompute_layers:
                logging.warning("EriDiffusion: memory_budget_gb plans for recomputed blocks, but recompute_layers "
                                "off keeps their layers' outputs on the GPU until backward: turn "
                                "recompute_layers on for the budget to hold")

        self.params = [p for layer in self.layers.values() for p in layer.parameters()]
        # Two parameter groups when the text encoder trains (its own learning rate): its layers come last
        te_count = sum(1 for layer in te_layers.values() for _ in layer.parameters())
        split = len(self.params) - te_count
        groups = (lambda params: [{"params": params[:split]}, {"params": params[split:]}]) if te_count else list
        self.te_lr_scale = (settings.text_encoder_lr / settings.learning_rate) if settings.text_encoder_lr else 1.0
        self.precision = resolve_precision(settings, compute_dtype(self.base_model))
        if settings.optimizer_offload:
            if self.precision == "fp16":
                raise ConfigError("optimizer_offload works with precision bf16 or fp32 (fp16 loss scaling needs "
                                  "the optimizer on the GPU): change one of them")
            self.optimizer = OffloadedOptimizer(
                self.params, lambda params: make_optimizer(groups(params), settings, torch.device("cpu"),
                                                           owns_storage=False))
        else:
            self.optimizer = make_optimizer(groups(self.params), settings, self.device)
        if state.optimizer is not None and state.optimizer_name == settings.optimizer:
            if state_fits(settings.optimizer, state.optimizer):
                load_optimizer_state(self.optimizer, cpu_copy(state.optimizer))
            else:
                logging.warning("EriDiffusion: the adapter's %s state was saved by torch's Adafactor, which this "
                                "version replaced by transformers' (a fixed learning rate, as kohya and ai-toolkit "
                                "run it): training continues with a new optimizer state", settings.optimizer)
        # The optimizer skips a NaN step on the device itself (fused AdamW, AdamW8bit): the step is queued behind the
        # micro-batches and the host reads the loss afterwards, instead of the GPU idling while the host reads
        # it, decides, and then launches the optimizer (~1,400 parameters of Python for SDXL's LoRA).
        self.skips_on_device = skips_on_device(self.optimizer)
        self.generator = torch.Generator()
        if state.rng is not None:
            self.generator.set_state(state.rng.clone())
        else:
            self.generator.manual_seed(settings.seed)
        # With a torch.distributed World (trainers/distributed.py) batches are global: each rank trains its share.
        self.world = world
        self.order = DataOrder(latents, settings.batch_size * (world.size if world else 1), settings.seed)
        self.reg_order = self._reg_order(latents, text, settings, world)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.step_count, self.cursor = state.step, state.cursor
        self.skipped, self.consecutive_skips = 0, 0
        self._step_start = None
        # step(ahead=True)'s micro-batches of the next step: (where its draws started, its summed loss)
        self.queued = None
        self.losses, self.lrs, self.steps = [], [], []
        self.val_steps, self.val_losses = [], []
        # Each step's summed gradients, where the optimizer (and clipping, and DDP's all-reduce) read them.
        # (AdamW8bit's are already there: views of its flat gradient)
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        # data parallel: the gradients as parts of flat tensors, all-reduced in place each step
        self.gradient_buckets = world.gradient_buckets(self.params) if world is not None else None
        self.gradients = [param.grad for param in self.params]
        self.ema_names, self.ema_params, self.ema = self._start_ema(state, settings)
        # Autocast only to compute in another dtype than the model's: for a bf16 model trained in bf16 it would
        # only add casts (and run norms in fp32, unlike ComfyUI's inference). Adapter layers cast their own
        # weights to the activations' dtype.
        self.autocast = AUTOCAST.get(self.precision)
        if self.autocast == compute_dtype(self.base_model):
            self.autocast = None
        # the dtype adapter layers see activations in, where it is known (autocast mixes dtypes)
        self.activation_dtype = compute_dtype(self.base_model) if self.autocast is None else None
        if settings.gradient_checkpointing:
            prime_attention(self.device, compute_dtype(self.base_model) if self.autocast is None else self.autocast)
        # (fp16's loss scale is a tensor on the device that the scaler updates in place: graphs read it anew)
        # (the text encoder's host work, tokens to embeddings, happens inside the micro-batch: no graphs then)
        if uses_graphs(settings, self.device, self.text_encoder is not None, self.streams):
            self.micro_batches = GraphedMicroBatches(self._loss_and_gradients, self.device)
        else:
            self.micro_batches = EagerMicroBatches(self._loss_and_gradients)
        # A replayed graph hands back the same gradient tensors every step. With one micro-batch per step and one
        # process they become the parameters' .grad themselves (_adopted): no copy of every gradient per
        # step (SDXL's 1,400: ~0.7 ms of copy kernels). Not where the gradients are views of flat tensors
        # (AdamW8bit's) or are summed (accumulation, regularisation batches, ranks), nor without graphs (new
        # tensors every step: setting 1,400 .grad costs the host more than the copy costs the GPU).
        self.adopts_gradients = (ADOPT_GRADIENTS and isinstance(self.micro_batches, GraphedMicroBatches)
                                 and settings.grad_accumulation == 1 and self.reg_order is None and world is None
                                 and all(p.grad._base is None for p in self.params))
        self.adopted = None
        # step(ahead=True) queues the next step's micro-batches early, except with fp16's loss scaler (its scale
        # changes after the read) and for schedule-free optimizers (their weights go to the evaluation point and
        # back between steps, not bit for bit the same). Across ranks too: the micro-batches make no collective
        # call, and the device runs the sums over ranks of one step before the next step's micro-batches write
        # the gradients again (NCCL's stream waits for the step's work; the step's stream waits for the sum).
        self.queues_ahead = self.scaler is None and not is_schedule_free(self.optimizer)

    def _install_fp8(self) -> None:
        """fp8_compute: the blocks' frozen Linear layers (adapted ones included, their adapter in its own dtype) run
        their GEMMs in FP8 (trainers/fp8.py), as object patches of the training clone only."""
        root = self.base_model.diffusion_model
        for path, forward in fp8.forwards(root, self.arch.block_modules(root), self.device).items():
            adapter = self.model_layers.get(path)
            self.patcher.add_object_patch(object_patch_key(path), forward if adapter is None else
                                          PatchedForward(root.get_submodule(path), adapter, fp8=forward))

    def _reg_order(self, latents: LatentSet, text: TextSet, settings: TrainingSettings, world) -> DataOrder | None:
        """The regularisation images' order (None without any), after checking that the dataset has training
        images, and the class captions differential output preservation needs."""
        items = latents.dataset.items
        if not self.order.groups:
            raise ConfigError("the dataset has only regularisation images (is_reg): combine them with training "
                              "images (Combine training images), or turn is_reg off")
        if settings.diff_output_preservation:
            if self.text_encoder is not None:
                raise ConfigError("diff_output_preservation and a text-encoder adapter (Create adapter's "
                                  "text_encoder) cannot train together yet: turn one of them off")
            if not any(item.preservation_class for item in items if not item.is_reg):
                raise ConfigError("diff_output_preservation needs the class word the trigger word stands for: set "
                                  "preservation_class (and trigger_word) on Training images, or turn "
                                  "diff_output_preservation off")
            missing = [c for c in latents.dataset.captions if c not in text]
            if missing:
                raise ConfigError(f"{len(missing)} caption(s) of the dataset were not cached (e.g. "
                                  f"{quoted(missing[0])}): connect the same dataset, with its preservation_class, "
                                  f"to Cache captions")
        if not any(item.is_reg for item in items):
            return None
        return DataOrder(latents, settings.batch_size * (world.size if world else 1), settings.seed, reg=True)

    def load(self) -> None:
        """The training clones on their device: the MODEL's, and the CLIP's when the text encoder trains; with
        memory_budget_gb, the MODEL's weights past the budget stay in CPU memory (trainers/offload.py)."""
        patchers = [self.patcher] + ([self.text_encoder.patcher] if self.text_encoder is not None else [])
        offload.load(patchers, self.resident)

    def _latent_shapes(self) -> list[tuple[int, ...]]:
        """The shape of a batch of each bucket's latents (what memory_budget_gb's estimate of activations reads)."""
        shapes = {tuple(latent.shape) for latent in self.latents.latents}
        return [(self.settings.batch_size, *shape) for shape in shapes]

    def _start_ema(self, state: AdapterState, settings: TrainingSettings):
        """(names, parameters, fp32 EMA tensors) with EMA on, from the state's EMA or (first run with it) from
        the weights as they are; ([], [], None) with it off."""
        if not settings.ema:
            return [], [], None
        pairs = [(f"{path}.{suffix}", param) for path, layer in self.layers.items()
                 for suffix, param in layer.tensors().items()]
        device = torch.device("cpu") if settings.ema_on_cpu else self.device
        start = state.ema or {}
        ema = [(start[name] if name in start else param.detach()).to(device, torch.float32, copy=True)
               for name, param in pairs]
        return [n for n, _ in pairs], [p for _, p in pairs], ema

    def _update_ema(self) -> None:
        """ema = decay·ema + (1-decay)·weights, after every ema_every-th optimizer step (a skipped step is none)."""
        if self.ema is None or self.step_count % self.settings.ema_every:
            return
        device = self.ema[0].device
        with torch.no_grad():
            current = [p.detach().to(device, torch.float32) for p in self.ema_params]
            torch._foreach_lerp_(self.ema, current, 1.0 - self.settings.ema_decay)

    # ---------------------------------------------------------------------------------------- one step
    def _micro_batch(self, reg: bool = False) -> dict[str, torch.Tensor] | None:
        """The next micro-batch's tensors on the device (host work and the run's randomness happen here), or
        None when this rank's share of a short global batch is empty. `reg`: the regularisation batch that goes
        with the training batch just drawn, from the same position of their own order, with randomness of its
        own (seeded by that position), so the training batches are drawn as they would be without them."""
        s = self.settings
        if reg:
            position = self.cursor - 1
            indices = self.reg_order.batch(position)
            gen = torch.Generator().manual_seed((s.seed * 1_000_003 + position) ^ REG_STREAM)
        else:
            indices = self.order.batch(self.cursor)
            self.cursor += 1
            gen = self.generator
        items = [self.latents.dataset.items[i] for i in indices]
        x0 = arches.latents_in(self.base_model, torch.stack([self.latents.latents[i] for i in indices]))
        preserve = s.diff_output_preservation and not reg
        contexts, preserved = self._captions(items, gen, preserve)
        mask = torch.stack([self.latents.masks[i] for i in indices])[:, None] if self.latents.masks else None
        controls = self.base_model.latent_format.process_in(torch.stack([self.latents.controls[i] for i in indices])) \
            if self.latents.controls else None
        noise = torch.randn(x0.shape, generator=gen)
        if s.noise_offset:
            noise = noise + s.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        sigma = self.arch.sample_sigmas(self.host_sampling, arches.Batch(x0, contexts, items), gen, self.settings)
        self.global_count = len(items)
        if self.world is not None:   # every rank drew the global batch's randomness; it keeps its share
            share = self.world.share(len(items))
            x0, noise, sigma, contexts, items = x0[share], noise[share], sigma[share], contexts[share], items[share]
            preserved = preserved[share]
            mask = mask[share] if mask is not None else None
            controls = controls[share] if controls is not None else None
            if not items:
                return None
        return self._inputs(x0, noise, sigma, contexts, items, mask, reg, preserved if preserve else None, controls)

    def _captions(self, items, gen: torch.Generator, preserve: bool) -> tuple[list, list]:
        """Each item's caption as drawn from `gen` (dropout, then one of shuffle_captions' cached orders): its
        cached embedding (the caption itself while the text encoder trains), and with `preserve` the embedding
        of the same caption with its trigger word replaced by the class word (differential output preservation)."""
        s = self.settings
        contexts, preserved = [], []
        for item in items:
            rate = max(s.caption_dropout, item.caption_dropout)
            dropped = rate > 0 and torch.rand((), generator=gen).item() < rate
            caption, variants = item.caption, item.caption_variants
            if variants:
                caption = variants[int(torch.randint(len(variants), (), generator=gen)) if len(variants) > 1 else 0]
            caption = "" if dropped else caption
            contexts.append(caption if self.text_encoder is not None else self.text.get(caption, item))
            if preserve:
                preserved.append(self.text.get(item.preserved(caption), item))
        return contexts, preserved

    def _inputs(self, x0, noise, sigma, contexts, items, mask, reg=False, preserved=None,
                controls=None) -> dict[str, torch.Tensor]:
        s = self.settings
        inputs = {"x0": to_device(x0, self.device), "noise": to_device(noise, self.device),
                  "sigma": to_device(sigma, self.device)}
        if self.text_encoder is not None:   # encoded in _weighted_losses, where gradients reach the text encoder
            inputs.update(captions=contexts, items=items, controls=controls)
        else:
            conditioning = self.arch.conditioning(self.base_model, arches.Batch(x0, contexts, items, controls), s,
                                                  self.device)
            inputs.update({f"cond.{name}": value for name, value in conditioning.items()})
        if mask is not None:    # masked loss: (B, 1, h, w) weights
            inputs["mask"] = to_device(mask, self.device)
        if reg:    # (a key of its own: a graph captured for a training batch is never replayed for these)
            inputs["reg_weight"] = to_device(torch.full((len(items),), s.reg_weight), self.device)
        if preserved is not None:
            conditioning = self.arch.conditioning(self.base_model, arches.Batch(x0, preserved, items, controls), s,
                                                  self.device)
            inputs.update({f"dop.{name}": value for name, value in conditioning.items()})
        return inputs

    def _loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Device work only (it is what a CUDA graph replays): no host syncs, no randomness. (Except while the text
        encoder trains: then its encoding of the captions happens here, and no graph is captured.)"""
        weighted = self._weighted_losses(inputs)
        if self.world is not None:   # this share's part of the global batch's mean
            return weighted.sum() / self.global_count
        return weighted.mean()

    def _weighted_losses(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each sample's loss times its timestep's weight (and a regularisation batch's reg_weight), plus its
        differential output preservation term."""
        ms, x0, noise, sigma = self.model_sampling, inputs["x0"], inputs["noise"], inputs["sigma"]
        conditioning = {name[5:]: value for name, value in inputs.items() if name.startswith("cond.")}
        if "captions" in inputs:    # the text encoder trains: this micro-batch's captions encoded by it
            batch = arches.Batch(x0, self.text_encoder.encode(inputs["captions"]), inputs["items"], inputs["controls"])
            conditioning = self.arch.conditioning(self.base_model, batch, self.settings, self.device)
        x_noisy = self.arch.noisy(ms, x0, noise, sigma)
        # No autocast weight cache: a captured graph must not keep casts made during capture.
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=False):
            prediction = self.arch.predict_from(self.base_model, ms, x_noisy, sigma, conditioning)
        target = self.arch.target(ms, x0, noise, sigma)
        # The loss in fp32 at least (fp64 models keep fp64: the gradient tests compare against it).
        wide = torch.promote_types(prediction.dtype, torch.float32)
        threshold = None
        if self.settings.loss_type in ("huber", "smooth_l1"):
            threshold = huber_threshold(self.settings, *self.arch.noise_levels(ms, sigma.to(wide)))
        elementwise = elementwise_loss(prediction.to(wide), target.to(wide), self.settings, threshold)
        if "mask" in inputs:    # kohya's masked loss: the mean of loss x mask
            elementwise = elementwise * inputs["mask"].to(wide)
        per_sample = elementwise.mean(dim=tuple(range(1, target.ndim)))
        per_sample = per_sample * self.arch.loss_weight(ms, sigma, self.settings)
        if "reg_weight" in inputs:
            per_sample = per_sample * inputs["reg_weight"]
        preservation = {name[4:]: value for name, value in inputs.items() if name.startswith("dop.")}
        if preservation:
            per_sample = per_sample + self.settings.diff_output_preservation_multiplier * self._preservation_loss(
                x_noisy, sigma, preservation, wide)
        return per_sample

    def validation_loss(self, validation: Validation) -> float:
        """The mean loss of the held-out images at fixed timesteps and noise, without gradients, the adapter in
        eval mode. Each image's noise depends only on the image (_identity), and images are summed in the order
        of their identities: the value is the same whatever the training run's randomness, the order of the
        images, or what else was evaluated, so runs compare. Training's generator is never drawn from."""
        latents, ms, count = validation.latents, self.model_sampling, len(VALIDATION_PERCENTS)
        sigma = torch.tensor([float(ms.percent_to_sigma(p)) for p in VALIDATION_PERCENTS])
        items = latents.dataset.items
        if bool(latents.controls) != bool(self.latents.controls):
            raise ConfigError("the training images " + ("have" if self.latents.controls else "lack") + " control "
                              "images and the validation images " + ("do not" if self.latents.controls else "do") +
                              ": give both Training images a control_folder, or neither")
        total = 0.0
        for layer in self.layers.values():
            layer.eval()
        try:
            with torch.no_grad(), cast_once(self.model_layers, self.activation_dtype):
                for i in sorted(range(len(items)), key=lambda i: _identity(items[i])):
                    item = items[i]
                    gen = torch.Generator().manual_seed(int(_identity(item)[:15], 16))
                    x0 = arches.latents_in(self.base_model, latents.latents[i][None]).repeat(count, 1, 1, 1)
                    noise = torch.randn(x0.shape, generator=gen)
                    try:
                        # (the trained text encoder, when there is one, encodes the caption in _weighted_losses)
                        contexts = [item.caption if self.text_encoder is not None
                                    else validation.text.get(item.caption, item)] * count
                    except KeyError:
                        raise ConfigError(f"the validation captions lack the caption of a validation image: connect "
                                          f"the validation images to the validation Cache captions") from None
                    mask = latents.masks[i][None, None].repeat(count, 1, 1, 1) if latents.masks else None
                    controls = self.base_model.latent_format.process_in(latents.controls[i][None]).repeat(
                        count, 1, 1, 1) if latents.controls else None
                    inputs = self._inputs(x0, noise, sigma, contexts, [item] * count, mask, controls=controls)
                    total += self._weighted_losses(inputs).double().sum().item()
        finally:
            for layer in self.layers.values():
                layer.train()
        loss = total / (len(items) * count)
        self.val_steps.append(self.step_count)
        self.val_losses.append(loss)
        return loss

    def _preservation_loss(self, x_noisy: torch.Tensor, sigma: torch.Tensor, conditioning: dict,
                           wide: torch.dtype) -> torch.Tensor:
        """Differential output preservation (ai-toolkit's diff_output_preservation), per sample: the mean squared
        difference between the prediction with the adapter and the model's own (the adapter off, no gradients),
        both on the class caption. Device work only: a CUDA graph captures the adapter switched off and on."""
        ms = self.model_sampling
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=False):
            with torch.no_grad(), adapters_off(self.layers):
                base = self.arch.predict_from(self.base_model, ms, x_noisy, sigma, conditioning)
            prediction = self.arch.predict_from(self.base_model, ms, x_noisy, sigma, conditioning)
        return (prediction.to(wide) - base.to(wide)).square().mean(dim=tuple(range(1, prediction.ndim)))

    def _loss_and_gradients(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        """The micro-batch's loss and its gradients of the adapter's parameters, as new tensors: autograd
        writes no .grad, so the step adds them up with a few multi-tensor kernels rather than one
        accumulation kernel per parameter, and a captured graph owns its outputs."""
        # (the text encoder computes in its own dtype: its layers cast at each use)
        staging = self.prefetcher.micro_batch() if self.streams and self.prefetcher else contextlib.nullcontext()
        with cast_once(self.model_layers, self.activation_dtype), training_attention(self.device), \
                fused.training_rope(self.device), offload.synchronous_copies(self.streams), staging:
            loss = self._loss(inputs)
            scaled = loss / self.settings.grad_accumulation
            gradients = torch.autograd.grad(self.scaler.scale(scaled) if self.scaler else scaled, self.params,
                                            allow_unused=True, materialize_grads=True)
        return loss.detach(), gradients

    def _adopted(self, gradients: tuple) -> bool:
        """Whether the micro-batch's `gradients` are now the parameters' .grad (adopts_gradients)."""
        if gradients is self.adopted:
            return True
        if not self.adopts_gradients or not all(
                g.dtype == p.dtype and g.shape == p.shape and g.device == p.device and g.is_contiguous()
                for g, p in zip(gradients, self.params)):
            return False
        for param, gradient in zip(self.params, gradients):
            param.grad = gradient
        self.gradients, self.adopted = list(gradients), gradients
        return True

    def step(self, ahead: bool = False) -> StepReport:
        """One optimizer step. `ahead`: another step follows at once (nothing reads the run in between but the
        report's callback and export()): its first micro-batch is drawn before this step's loss is read and
        queued on the device as soon as this step's optimizer step is, so the GPU runs it while the host reads the
        loss and reports (measured on an H200, SDXL with CUDA graphs: 0.0802 -> 0.0777 s/step, the GPU idle
        between steps 4.6 -> 2.3 ms, the optimizer's kernels). The same numbers as without: the micro-batch only
        reads the weights, after the optimizer step in the device's order, and its draws come in the same order;
        export() in between gives the run as of this step."""
        started = time.perf_counter()
        queued, self.queued = self.queued, None
        if queued is None:
            # what export() gives while a step is under way: the last finished step (Cancel or an error mid-step)
            self._step_start = (self.cursor, self.generator.get_state().clone())
        to_training_point(self.optimizer)
        try:
            return self._step(started, queued, ahead and self.queues_ahead)
        finally:   # between steps (export, sampling, an error) the weights are those to evaluate with
            to_evaluation_point(self.optimizer)

    def _gradients(self, first: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Runs the step's micro-batches (`first`: its first one, already drawn); their gradients summed where the
        optimizer reads them. Returns the summed loss (on the device)."""
        accumulation = self.settings.grad_accumulation
        loss_sum = None
        # with regularisation images, a batch of them alongside each batch of training images
        kinds = (False, True) if self.reg_order is not None else (False,)
        for _ in range(accumulation):
            for reg in kinds:
                inputs = first if first is not None else self._micro_batch(reg)
                first = None
                if inputs is None:
                    continue
                loss, gradients = self.micro_batches(inputs, (self.global_count,))
                # used up before the next micro-batch: a graph's replay overwrites its outputs
                if not self._adopted(gradients):
                    (torch._foreach_copy_ if loss_sum is None else torch._foreach_add_)(self.gradients,
                                                                                       list(gradients))
                loss_sum = loss.clone() if loss_sum is None else loss_sum + loss
        if loss_sum is None:     # this rank's shares were all empty: it adds nothing to the sum over ranks
            torch._foreach_zero_(self.gradients)
            loss_sum = torch.zeros((), device=self.device)
        return loss_sum

    def _draw_next(self) -> tuple:
        """step's `ahead`: (where the next step's draws start, its first micro-batch on its way to the device)."""
        start = (self.cursor, self.generator.get_state().clone())
        try:
            return start, self._micro_batch()
        except Exception as error:    # the next step's: raised there, once this one is done
            return start, error

    def _queue_next(self, drawn: tuple) -> None:
        """The next step's micro-batches, queued behind this step's optimizer step (step's `ahead`)."""
        start, first = drawn
        if not isinstance(first, Exception):
            try:
                first = self._gradients(first)
            except Exception as error:    # (out of memory, Cancel) the next step's: raised there
                first = error
        self.queued = (start, first)

    def _step(self, started: float, queued: tuple | None, ahead: bool) -> StepReport:
        accumulation = self.settings.grad_accumulation
        if queued is not None and isinstance(queued[1], Exception):
            raise queued[1]
        loss_sum = self._gradients() if queued is None else queued[1]
        if self.world is not None:
            loss_sum = self.world.sum(loss_sum)
            self.gradient_buckets.sum_over_ranks()
        lr = learning_rate(self.settings, self.step_count, self.schedule_steps)
        for index, group in enumerate(self.optimizer.param_groups):   # group 1: the text encoder's
            group["lr"] = lr * self.te_lr_scale if index == 1 else lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm or math.inf)
        mean_loss = loss_sum / accumulation
        if self.skips_on_device:
            self._optimizer_step(bad=~(torch.isfinite(norm) & torch.isfinite(mean_loss)))
        # The one read from the device per step. A NaN loss makes NaN gradients, so no step uses either.
        values = DeviceRead(torch.stack([mean_loss, norm.to(loss_sum.dtype)]))
        # (the host draws the next batch before it waits; other optimizers need the read before their step)
        drawn = self._draw_next() if ahead else None
        if ahead and self.skips_on_device:
            self._queue_next(drawn)
        total, norm = values.read()
        problem = None
        if not math.isfinite(total):
            problem = f"the loss became {total}"
        # fp16's loss scaler skips steps with inf gradients itself (and lowers its scale)
        elif not self.scaler and not math.isfinite(norm):
            problem = "the gradients became NaN/inf"
        if problem is not None:
            if self.scaler and not self.skips_on_device:   # it unscaled this step's gradients: lowers its scale
                self.scaler.update()
            if self.skips_on_device and not self.scaler:    # (the scaler skips with its own flag, on the host)
                step_skipped_on_device(self.optimizer)
            self.consecutive_skips += 1
            if self.settings.nan_policy == "stop" or self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                to_evaluation_point(self.optimizer)    # the state it carries is that of a finished step
                raise TrainingError(
                    f"{problem} at step {self.step_count + 1}"
                    + (f" ({self.consecutive_skips} steps in a row)" if self.consecutive_skips > 1 else "")
                    + ": lower the learning rate, use precision bf16 or fp32, or set max_grad_norm; the adapter "
                      "keeps its weights from the last good step", self.export())
            self.skipped += 1
            logging.warning("EriDiffusion: %s at step %d; step skipped (%d so far)", problem, self.step_count + 1,
                            self.skipped)
            total = math.nan
        else:
            self.consecutive_skips = 0
            if not self.skips_on_device:    # (else it stepped above)
                self._optimizer_step()
        if ahead and not self.skips_on_device:
            self._queue_next(drawn)
        self.step_count += 1
        if problem is None:
            self._update_ema()
        self.steps.append(self.step_count)
        self.losses.append(total)
        self.lrs.append(lr)
        # export() until the next step: this one's end, before the queued micro-batches' draws
        self._step_start = self.queued[0] if self.queued is not None else None
        return StepReport(self.step_count, self.end_step, total, lr, time.perf_counter() - started,
                          skipped=problem is not None, export=self.export)

    def _optimizer_step(self, bad: torch.Tensor | None = None) -> None:
        """The optimizer's step; with `bad` (a device flag), skipped on the device where it is set. fp16's scaler
        finds the inf/NaN gradients that a NaN loss makes itself, and skips (and lowers its scale) on the device
        with fused AdamW too."""
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif bad is not None:
            step_skipping_on_device(self.optimizer, bad.float())
        else:
            self.optimizer.step()

    def export(self) -> AdapterState:
        """The adapter after the last finished step: resuming from it continues exactly."""
        import uuid
        from .adapters import method
        cursor, rng = self._step_start or (self.cursor, self.generator.get_state())
        # One id for the whole run (its saves and the state it returns; chained Train steps and resumes pass
        # it on): a save series of another run is never overwritten (checkpoint.prefix_for_run).
        run_id = self.state.run_id or self.__dict__.setdefault("new_run_id", uuid.uuid4().hex)
        return self.state.replace(
            weights=method(self.state.spec.kind).layer_weights(self.layers),
            step=self.step_count, cursor=cursor,
            optimizer=cpu_copy(self.optimizer.state_dict()), optimizer_name=self.settings.optimizer,
            rng=rng.clone(),
            history=self.state.history.extended(self.steps, self.losses, self.lrs, self.val_steps, self.val_losses),
            settings=self.settings.to_dict(), run_id=run_id,
            ema=None if self.ema is None else {n: t.to("cpu", copy=True) for n, t in zip(self.ema_names, self.ema)})


@contextlib.contextmanager
def long_lived_objects_frozen():
    """Python's garbage collector leaves the objects that exist when training starts alone until it ends.

    A full collection walks every object of the process: ~400k in a process with ComfyUI and a full-size SDXL
    loaded, 190 ms on a 2-core CPU machine and 200-230 ms on the H200 machine (measured), once every 30 or so
    checkpointed SDXL steps there: the host stops in the middle of a step and the GPU waits. Collected first,
    so no garbage is kept; afterwards every object goes back to the collector, also those someone froze before
    (the GPU machine's Python starts with a few hundred frozen): freezing only tells the collector what not to
    walk, never what is freed, so unfreezing theirs costs at most a later collection's time."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train(patcher, state: AdapterState, latents: LatentSet, text: TextSet, settings: TrainingSettings,
          steps: int, on_step: Callable[[StepReport], None] | None = None,
          on_every: Callable[["TrainingRun"], None] | None = None, every: int = 0, world=None,
          on_stopped: Callable[[AdapterState], None] | None = None,
          validation: Validation | None = None, clip=None) -> AdapterState:
    """Train `steps` optimizer steps and return the new state. `on_step` may raise to stop (Cancel).
    `on_every(run)` runs after each step whose number is a multiple of `every`, and after the last step, with
    the run as it is then (sampling reads `run.export()`); it may load other models: the run's own is loaded
    again before the next step. `world` (trainers.distributed.World) trains this rank's share of batches
    `world.size` times larger, with gradients summed over the ranks. When training stops early — Cancel
    (ComfyUI's interrupt), NaN, out of memory, any error — `on_stopped` gets the adapter as of the last
    finished step (to save it) before the exception goes on. `validation`: a held-out set whose loss the
    reports carry (StepReport.val_loss) on the steps it is due. `clip` (comfy.sd.CLIP) is needed when the adapter
    trains the text encoder; it is not changed either."""
    run = None
    try:
        with torch.inference_mode(False), torch.enable_grad(), long_lived_objects_frozen(), training_mode():
            run = TrainingRun(patcher, state, latents, text, settings, end_step=state.step + steps, world=world,
                              clip=clip)

            def run_pauses_after(step: int) -> bool:
                """Whether anything but the next step's micro-batches uses the device after `step`."""
                last = step == run.end_step
                return (last or (validation is not None and validation.due(step, last))
                        or bool(on_every and every > 0 and step % every == 0))

            for _ in range(steps):
                report = run.step(ahead=not run_pauses_after(run.step_count + 1))
                if validation is not None and validation.due(run.step_count, run.step_count == run.end_step):
                    report = dataclasses.replace(report, val_loss=run.validation_loss(validation))
                if on_step:
                    on_step(report)
                if on_every and every > 0 and (run.step_count % every == 0 or run.step_count == run.end_step):
                    on_every(run)
                    run.load()
                    run.micro_batches.reset()    # the weights may have moved while other models were loaded
            return run.export()
    except BaseException as stop:
        last_good = getattr(stop, "state", None)
        if last_good is None and run is not None and run.step_count > state.step:
            last_good = run.export()
        if on_stopped is not None and last_good is not None and last_good.step > state.step:
            on_stopped(last_good)
        if not isinstance(stop, torch.OutOfMemoryError):
            raise
        step = run.step_count + 1 if run is not None else state.step + 1
        attempted, total = offload.device_memory(patcher.load_device, stop)
        # the training clone's weights on the device (a dynamic MODEL trains on its delegate: trainable_patcher)
        resident = (run.patcher if run is not None else patcher).loaded_size()
        advice = offload.budget_advice(settings.memory_budget_gb, attempted, total, resident)
        del run
        # Give the memory back so ComfyUI keeps working: the training clone and anything else loaded.
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        raise TrainingError(
            f"out of GPU memory at step {step} (batch_size {settings.batch_size}, resolution "
            f"{latents.dataset.config.resolution}, gradient_checkpointing "
            f"{'on' if settings.gradient_checkpointing else 'off'}): lower batch_size or the dataset resolution, "
            f"turn gradient_checkpointing on, load the model with weight_dtype fp8_e4m3fn, or turn "
            f"optimizer_offload on" + (f"; {advice}" if advice else "") + ". The models were unloaded; nothing "
            f"trained before this step is lost", last_good) from stop
