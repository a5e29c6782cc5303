"""Training settings, the Train steps node and the loss graph."""
from __future__ import annotations

import logging
import time

import torch
from comfy_api.latest import io, ui
from comfy.utils import ProgressBar

from ..trainers import loop
from ..trainers.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainingSettings, help_of
from ..trainers.plot import render_loss
from ..trainers.state import patched_model
from .types import CATEGORY, Adapter, Latents, Loss, Settings, Text

STEP_EVENT = "eridiffusion.step"


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
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16", tooltip=_tip("precision")),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip=_tip("gradient_checkpointing")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip=_tip("seed")),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_tip("noise_offset")),
                io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.5, tooltip=_tip("min_snr_gamma")),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip=_tip("caption_dropout")),
            ],
            outputs=[Settings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(TrainingSettings(**values))


def _send_step(node_id, report: loop.StepReport, started: float, first_step: int) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    server = PromptServer.instance if hasattr(PromptServer, "instance") else None
    if server is None:
        return
    done = report.step - first_step
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    server.send_sync(STEP_EVENT, {
        "node": node_id, "step": report.step, "total": report.total, "loss": report.loss,
        "lr": report.learning_rate, "it_per_s": rate,
        "eta_s": (report.total - report.step) / rate if rate > 0 else None,
    }, server.client_id)


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
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter applied."),
                Adapter.Output(display_name="adapter", tooltip="The adapter after these steps."),
                Loss.Output(display_name="loss", tooltip="Loss history since the adapter was created."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, adapter, latents, captions, settings, steps) -> io.NodeOutput:
        bar = ProgressBar(steps)
        first, started = adapter.step, time.perf_counter()
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def on_step(report: loop.StepReport):
            logging.info("EriDiffusion: step %d/%d loss %.5f lr %.3g", report.step, report.total, report.loss,
                         report.learning_rate)
            _send_step(node_id, report, started, first)
            bar.update_absolute(report.step - first, steps)   # also ComfyUI's Cancel check

        trained = loop.train(model, adapter, latents, captions, settings, steps, on_step=on_step)
        return io.NodeOutput(patched_model(model, trained), trained, trained.history)


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
    def execute(cls, loss, smoothing) -> io.NodeOutput:
        image = torch.from_numpy(render_loss(loss, smoothing=smoothing).copy()).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [EriTrainingSettings, EriTrainSteps, EriLossGraph]
