"""Training settings, the Train steps node and the loss graph."""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui
from comfy.utils import ProgressBar

from ..trainers import checkpoint, loop
from ..trainers.config import (COMPILE_MODES, HUBER_SCHEDULES, LOSS_TYPES, LOSS_WEIGHTINGS, MEMORY_BUDGET_MAX_GB,
                                NAN_POLICIES, OPTIMIZERS, PRECISIONS, SCHEDULES, TIMESTEP_SAMPLINGS, ConfigError,
                                TrainingSettings, help_of)
from ..trainers.plot import render_loss
from ..trainers.sampling import sample_round
from ..trainers.state import patched_clip, patched_model
from . import checks, paths
from . import live as live_view
from .sample import captioned_previews, save_samples
from .types import CATEGORY, Adapter, Latents, Loss, Sampling, Settings, Text


def _tip(name: str) -> str:
    return help_of(TrainingSettings, name)


class EriTrainingSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTrainingSettings", display_name="Training settings", category=f"{CATEGORY}/train",
            description="Optimizer, schedule, batch and precision for Train steps.",
            inputs=[
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", tooltip=_tip("optimizer")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6, round=False,
                               tooltip=_tip("learning_rate")),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant", tooltip=_tip("schedule")),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, tooltip=_tip("warmup_steps")),
                io.Int.Input("total_steps", default=0, min=0, max=1000000, tooltip=_tip("total_steps")),
                io.Float.Input("weight_decay", default=0.01, min=0.0, max=1.0, step=0.001, tooltip=_tip("weight_decay")),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1, tooltip=_tip("max_grad_norm")),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip=_tip("batch_size")),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024, tooltip=_tip("grad_accumulation")),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", tooltip=_tip("precision")),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip=_tip("gradient_checkpointing")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip=_tip("seed")),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_tip("noise_offset")),
                io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.5, tooltip=_tip("min_snr_gamma")),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip=_tip("caption_dropout")),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default="auto",
                               tooltip=_tip("timestep_sampling"), optional=True),
                io.Float.Input("logit_mean", default=0.0, min=-5.0, max=5.0, step=0.05, tooltip=_tip("logit_mean"),
                               optional=True),
                io.Float.Input("logit_std", default=1.0, min=0.01, max=5.0, step=0.05, tooltip=_tip("logit_std"),
                               optional=True),
                io.Float.Input("sigmoid_scale", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip=_tip("sigmoid_scale"), optional=True),
                io.Float.Input("timestep_shift", default=0.0, min=0.0, max=100.0, step=0.05,
                               tooltip=_tip("timestep_shift"), optional=True),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="none",
                               tooltip=_tip("loss_weighting"), optional=True),
                io.Float.Input("flux_guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip=_tip("flux_guidance"), optional=True),
                io.Boolean.Input("optimizer_offload", default=False, tooltip=_tip("optimizer_offload"),
                                 optional=True),
                io.Combo.Input("nan_policy", options=list(NAN_POLICIES), default="stop", tooltip=_tip("nan_policy"),
                               optional=True),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="cuda_graphs",
                               tooltip=_tip("compile"), optional=True),
                io.Float.Input("checkpoint_fraction", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip=_tip("checkpoint_fraction"), optional=True),
                io.Boolean.Input("recompute_attention", default=False, tooltip=_tip("recompute_attention"),
                                 optional=True),
                # schedule shapes and loss types
                io.Int.Input("schedule_cycles", default=1, min=1, max=1000, tooltip=_tip("schedule_cycles"),
                             optional=True),
                io.Float.Input("schedule_power", default=1.0, min=0.01, max=10.0, step=0.1,
                               tooltip=_tip("schedule_power"), optional=True),
                io.Int.Input("schedule_step_size", default=0, min=0, max=1000000, tooltip=_tip("schedule_step_size"),
                             optional=True),
                io.Float.Input("schedule_gamma", default=0.1, min=0.001, max=1.0, step=0.01,
                               tooltip=_tip("schedule_gamma"), optional=True),
                io.Combo.Input("loss_type", options=list(LOSS_TYPES), default="mse", tooltip=_tip("loss_type"),
                               optional=True),
                io.Combo.Input("huber_schedule", options=list(HUBER_SCHEDULES), default="snr",
                               tooltip=_tip("huber_schedule"), optional=True),
                io.Float.Input("huber_c", default=0.1, min=0.001, max=1.0, step=0.01, tooltip=_tip("huber_c"),
                               optional=True),
                io.Float.Input("huber_scale", default=1.0, min=0.001, max=100.0, step=0.1,
                               tooltip=_tip("huber_scale"), optional=True),
                # EMA of the adapter's weights
                io.Boolean.Input("ema", default=False, tooltip=_tip("ema"), optional=True),
                io.Float.Input("ema_decay", default=0.999, min=0.5, max=0.99999, step=0.0001, round=False,
                               tooltip=_tip("ema_decay"), optional=True),
                io.Int.Input("ema_every", default=1, min=1, max=1000000, tooltip=_tip("ema_every"), optional=True),
                io.Boolean.Input("ema_on_cpu", default=False, tooltip=_tip("ema_on_cpu"), optional=True),
                # regularisation images, differential output preservation
                io.Float.Input("reg_weight", default=1.0, min=0.0, max=1000.0, step=0.05, tooltip=_tip("reg_weight"),
                               optional=True),
                io.Boolean.Input("diff_output_preservation", default=False, tooltip=_tip("diff_output_preservation"),
                                 optional=True),
                io.Float.Input("diff_output_preservation_multiplier", default=1.0, min=0.0, max=1000.0, step=0.05,
                               tooltip=_tip("diff_output_preservation_multiplier"), optional=True),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip=_tip("text_encoder_lr"), optional=True),
                io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=MEMORY_BUDGET_MAX_GB, step=0.5,
                               round=False, tooltip=_tip("memory_budget_gb"), optional=True),
                io.Boolean.Input("fp8_compute", default=False, tooltip=_tip("fp8_compute"), optional=True),
                io.Boolean.Input("recompute_layers", default=True, tooltip=_tip("recompute_layers"),
                                 optional=True),
            ],
            outputs=[Settings.Output(display_name="settings")],
        )

    @classmethod
    def validate_inputs(cls, learning_rate=None, weight_decay=None, max_grad_norm=None, noise_offset=None,
                        min_snr_gamma=None, caption_dropout=None, logit_mean=None, logit_std=None, sigmoid_scale=None,
                        timestep_shift=None, flux_guidance=None, checkpoint_fraction=None, schedule_power=None,
                        schedule_gamma=None, huber_c=None, huber_scale=None, ema_decay=None, reg_weight=None,
                        diff_output_preservation_multiplier=None, text_encoder_lr=None, memory_budget_gb=None,
                        fp8_compute=None):
        from ..trainers import fp8
        return checks.verdict(checks.numbers_problem(
            cls, learning_rate=learning_rate, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            noise_offset=noise_offset, min_snr_gamma=min_snr_gamma, caption_dropout=caption_dropout,
            logit_mean=logit_mean, logit_std=logit_std, sigmoid_scale=sigmoid_scale, timestep_shift=timestep_shift,
            flux_guidance=flux_guidance, checkpoint_fraction=checkpoint_fraction, schedule_power=schedule_power,
            schedule_gamma=schedule_gamma, huber_c=huber_c, huber_scale=huber_scale, ema_decay=ema_decay,
            reg_weight=reg_weight, diff_output_preservation_multiplier=diff_output_preservation_multiplier,
            text_encoder_lr=text_encoder_lr, memory_budget_gb=memory_budget_gb),
            # the GPU training runs on (ComfyUI's device): at Queue rather than after the caches were built
            bool(fp8_compute) and checks.guarded(
                lambda: fp8.check_device(comfy.model_management.get_torch_device())))

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(TrainingSettings(**values))


class EriTrainSteps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTrainSteps", display_name="Train steps", category=f"{CATEGORY}/train",
            description="Trains the adapter for a number of steps and returns the MODEL with it applied (use it "
                        "with any sampler) and the new adapter state. Chain several to train in stages.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (the adapter is applied on a copy; this one is untouched)."),
                Adapter.Input("adapter", tooltip="From Create adapter, Load adapter or an earlier Train steps."),
                Latents.Input("latents", tooltip="From Cache latents."),
                Text.Input("captions", tooltip="From Cache captions (same dataset as the latents)."),
                Settings.Input("settings", tooltip="From Training settings."),
                io.Int.Input("steps", default=100, min=1, max=1000000, tooltip="Optimizer steps to train in this node."),
                Sampling.Input("sampling", optional=True,
                               tooltip="From Sampling settings: sample images every N steps and after the last "
                                       "step, shown on this node while it trains and saved under output/."),
                io.Int.Input("save_every", default=0, min=0, max=1000000, optional=True,
                             tooltip="Save the adapter (and its full training state, to resume exactly) every N "
                                     "steps to models/loras/<save_prefix>_<step>.safetensors, and when training "
                                     "stops early (Cancel, an error). 0 = no saves from this node."),
                io.Int.Input("keep_last", default=3, min=0, max=100000, optional=True,
                             tooltip="Keep only the newest K saves of save_prefix (0 = keep all)."),
                io.String.Input("save_prefix", default="eri/checkpoints/my_lora", optional=True,
                                tooltip="File name under models/loras for save_every; the step number is appended."),
                # validation loss on a held-out set
                Latents.Input("validation_latents", optional=True,
                              tooltip="Held-out images (their own Training images and Cache latents, not trained "
                                      "on): their loss is evaluated every validation_every steps and after the last "
                                      "step, at fixed timesteps and noise (the same in every run, whatever the seed "
                                      "or the images' order), without changing training, with the weights being "
                                      "trained (not their EMA). It is shown on the live chart, in the Loss graph "
                                      "and in the log. Connect validation_captions too."),
                Text.Input("validation_captions", optional=True,
                           tooltip="Cache captions of the held-out images (with validation_latents)."),
                io.Int.Input("validation_every", default=50, min=1, max=1000000, optional=True,
                             tooltip="Evaluate the validation loss every N steps (and after the last step). Each "
                                     "evaluation runs the model on every held-out image at 4 timesteps."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP the adapter was created with, when it trains the text encoder "
                                      "(Create adapter's text_encoder): captions are then encoded by it every "
                                      "step (on a copy; this one is untouched). Without a text-encoder adapter "
                                      "it is passed through to the clip output."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter applied."),
                Adapter.Output(display_name="adapter", tooltip="The adapter after these steps."),
                Loss.Output(display_name="loss", tooltip="Loss history since the adapter was created."),
                io.Image.Output(display_name="samples",
                                tooltip="The images sampled during these steps, in order (an empty batch without "
                                        "sampling settings); a prompt with its own size is resized to the first "
                                        "prompt's here (its saved file keeps its size)."),
                # last: outputs are addressed by index in saved workflows
                io.Clip.Output(display_name="clip",
                               tooltip="The CLIP with the trained text-encoder adapter applied (for CLIP Text "
                                       "Encode); the clip input as it is when the adapter has none."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def validate_inputs(cls, save_every=None, save_prefix=None, validation_every=None):
        return checks.verdict(
            checks.numbers_problem(cls, save_every=save_every, validation_every=validation_every),
            bool(save_every) and save_prefix is not None and checks.guarded(
                lambda: paths.lora_prefix(save_prefix, "save_prefix")))

    @classmethod
    def execute(cls, model, adapter, latents, captions, settings, steps, sampling=None, save_every=0, keep_last=3,
                save_prefix="eri/checkpoints/my_lora", validation_latents=None, validation_captions=None,
                validation_every=50, clip=None) -> io.NodeOutput:
        if (validation_latents is None) != (validation_captions is None):
            raise ConfigError("validation_latents and validation_captions go together: connect both (the held-out "
                              "images' Cache latents and Cache captions) or neither")
        validation = loop.Validation(validation_latents, validation_captions, validation_every) \
            if validation_latents is not None else None
        bar = ProgressBar(steps)
        if save_every:
            # A bad prefix fails before training, and the run's saves (every N steps and the one when it
            # stops) all go under one prefix, chosen here.
            adapter, save_prefix, note = paths.lora_series(adapter, save_prefix, "save_prefix", adapter.step + steps)
            if note:
                logging.warning("EriDiffusion: %s", note)

        saved = []

        def save(state):
            path = paths.lora_file(save_prefix, state.step, "save_prefix")
            checkpoint.save_adapter(state, path, "fp16")
            saved.append(os.path.relpath(path, paths.loras_folder()))
            checkpoint.prune_saves(lambda step: paths.lora_file(save_prefix, step, "save_prefix"), keep_last)
        first = adapter.step
        hidden = cls.hidden
        live = live_view.LiveRun(hidden.unique_id if hidden is not None else None, adapter.history, first,
                                 first + steps, live_view.workflow_id(hidden.extra_pnginfo if hidden else None))
        images, sample_files = [], []

        def on_step(report: loop.StepReport):
            logging.info("EriDiffusion: step %d/%d loss %.5f lr %.3g%s", report.step, report.total, report.loss,
                         report.learning_rate,
                         "" if report.val_loss is None else f" validation loss {report.val_loss:.5f}")
            live.step(report)
            if save_every and report.step % save_every == 0:
                save(report.export())
            # ComfyUI checks Cancel in the progress bar's updates, but 0.33's bar sends one only 0.1 s and 0.5 %
            # after the last: check after every step here.
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(report.step - first, steps)

        def on_every(run: loop.TrainingRun):
            samples = sample_round(model, run.export(), sampling)
            images.extend(s.image for s in samples)
            sample_files.extend(save_samples(samples, sampling))
            live.images_saved(captioned_previews(samples))

        try:
            trained = loop.train(model, adapter, latents, captions, settings, steps, on_step=on_step,
                                 on_every=on_every if sampling else None,
                                 every=sampling.every_n_steps if sampling else 0,
                                 # Cancel or an error: keep the last finished step, if saves were asked for
                                 on_stopped=save if save_every else None, validation=validation, clip=clip)
        except BaseException as stop:   # 0.33's InterruptProcessingException is a BaseException
            cancelled = isinstance(stop, comfy.model_management.InterruptProcessingException)
            live.finish(live_view.CANCELLED if cancelled else live_view.FAILED, saved[-1] if saved else None,
                        None if cancelled else live_view.first_line(stop))
            raise
        live.finish(live_view.FINISHED, saved[-1] if saved else None)
        batch = _one_batch(images)
        # the node shows the captioned previews; the files under output/ are listed for scripts (queue_workflow)
        shown = {"images": live.images, "eri_samples": sample_files} if live.images else None
        return io.NodeOutput(patched_model(model, trained), trained, trained.history, batch,
                             None if clip is None else patched_clip(clip, trained), ui=shown)


def _one_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """The samples as one IMAGE batch: an image of another size than the first (a prompt's own --w / --h) is
    resized to the first's (its saved file keeps its size)."""
    if not images:
        return torch.zeros((0, 64, 64, 3))
    height, width = images[0].shape[:2]
    return torch.stack([image if image.shape[:2] == (height, width) else
                        comfy.utils.common_upscale(image.movedim(-1, 0)[None], width, height, "bilinear",
                                                   "disabled")[0].movedim(0, -1) for image in images])


class EriLossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriLossGraph", display_name="Loss graph", category=f"{CATEGORY}/train",
            description="Plots the training loss (raw and smoothed) against the step.",
            is_output_node=True,
            inputs=[
                Loss.Input("loss", tooltip="From Train steps."),
                io.Float.Input("smoothing", default=0.9, min=0.0, max=0.999, step=0.01,
                               tooltip="Exponential moving-average weight of the smoothed curve."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def validate_inputs(cls, smoothing=None):
        return checks.verdict(checks.numbers_problem(cls, smoothing=smoothing))

    @classmethod
    def execute(cls, loss, smoothing) -> io.NodeOutput:
        image = torch.from_numpy(render_loss(loss, smoothing=smoothing).copy()).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [EriTrainingSettings, EriTrainSteps, EriLossGraph]
