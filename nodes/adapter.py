"""Create, save and load adapters."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..trainers import adapters, checkpoint
from ..trainers.arch import ARCHITECTURES
from ..trainers.config import TEXT_ENCODERS, AdapterSpec, help_of
from ..trainers.state import new_adapter
from . import checks, paths
from .types import CATEGORY, Adapter

PRESETS = sorted({p for a in ARCHITECTURES.values() for p in a.presets},
                 key=lambda p: ("attention", "attention_mlp", "all_linear").index(p))


def _tip(name: str) -> str:
    return help_of(AdapterSpec, name)


class EriCreateAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriCreateAdapter", display_name="Create adapter", category=f"{CATEGORY}/adapter",
            description="A new, untrained adapter for the layers of this MODEL (it changes nothing until trained).",
            inputs=[
                io.Model.Input("model", tooltip="The model the adapter is for (from the checkpoint loader)."),
                io.Combo.Input("adapter_type", options=list(adapters.ADAPTERS), default="lora", tooltip=_tip("kind")),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip=_tip("rank")),
                io.Float.Input("alpha", default=16.0, min=0.0, max=4096.0, step=0.5, tooltip=_tip("alpha")),
                io.Combo.Input("target", options=PRESETS, default="attention_mlp", tooltip=_tip("preset")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip=_tip("seed")),
                io.Combo.Input("dtype", options=["fp32", "bf16"], default="fp32", tooltip=_tip("dtype")),
                # Optional, so prompts written before these inputs existed still run (with the defaults).
                io.Boolean.Input("dora", default=False, optional=True, tooltip=_tip("dora")),
                io.Int.Input("lokr_factor", default=-1, min=-1, max=1024, optional=True, tooltip=_tip("lokr_factor")),
                io.Boolean.Input("lokr_full_w2", default=False, optional=True, tooltip=_tip("lokr_full_w2")),
                io.Boolean.Input("conv_layers", default=False, optional=True, tooltip=_tip("conv")),
                io.Int.Input("conv_rank", default=0, min=0, max=1024, optional=True, tooltip=_tip("conv_rank")),
                io.Float.Input("conv_alpha", default=0.0, min=0.0, max=4096.0, step=0.5, optional=True,
                               tooltip=_tip("conv_alpha")),
                io.Combo.Input("text_encoder", options=list(TEXT_ENCODERS), default="none", optional=True,
                               tooltip=_tip("text_encoder")),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP the model was loaded with: needed when text_encoder is not none "
                                      "(its layers are matched; connect the same CLIP to Train steps)."),
            ],
            outputs=[Adapter.Output(display_name="adapter")],
        )

    @classmethod
    def validate_inputs(cls, alpha=None, conv_alpha=None):
        return checks.verdict(checks.numbers_problem(cls, alpha=alpha, conv_alpha=conv_alpha))

    @classmethod
    def execute(cls, model, adapter_type, rank, alpha, target, seed, dtype, dora=False, lokr_factor=-1,
                lokr_full_w2=False, conv_layers=False, conv_rank=0, conv_alpha=0.0, text_encoder="none",
                clip=None) -> io.NodeOutput:
        spec = checkpoint.make_spec(model, adapter_type, rank, alpha, target, seed, dtype, dora=dora,
                                    lokr_factor=lokr_factor, lokr_full_w2=lokr_full_w2, conv=conv_layers,
                                    conv_rank=conv_rank, conv_alpha=conv_alpha, text_encoder=text_encoder, clip=clip)
        return io.NodeOutput(new_adapter(spec, model, clip))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


class EriSaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriSaveAdapter", display_name="Save adapter", category=f"{CATEGORY}/adapter",
            description="Writes models/loras/<prefix>_<step>.safetensors (loadable by ComfyUI's LoRA loaders) "
                        "and the training state beside it (<name>.eri-state) for resuming.",
            is_output_node=True,
            inputs=[
                Adapter.Input("adapter", tooltip="The trained adapter."),
                io.String.Input("filename_prefix", default="eri/my_lora",
                                tooltip="File name under models/loras; the step number is appended."),
                io.Combo.Input("save_dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Precision of the weights in the LoRA file (the state file keeps full precision)."),
            ],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        return checks.verdict(filename_prefix is not None and checks.guarded(
            lambda: paths.lora_prefix(filename_prefix, "filename_prefix")))

    @classmethod
    def execute(cls, adapter, filename_prefix, save_dtype) -> io.NodeOutput:
        adapter, prefix, note = paths.lora_series(adapter, filename_prefix, "filename_prefix", adapter.step)
        path = paths.lora_file(prefix, adapter.step)
        checkpoint.save_adapter(adapter, path, save_dtype)
        name = os.path.relpath(path, paths.loras_folder())
        text = f"saved {name} (step {adapter.step}, {_size(os.path.getsize(path))})" + (f"\n{note}" if note else "")
        return io.NodeOutput(name, ui=ui.PreviewText(text))


class EriLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriLoadAdapter", display_name="Load adapter", category=f"{CATEGORY}/adapter",
            description="Resumes an adapter saved by Save adapter (weights, optimizer, schedule, RNG and step), "
                        "or continues training a LoRA / DoRA / LoKr / LoHa file of another trainer (connect "
                        "the MODEL for those).",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A file in models/loras: written by Save adapter, or a LoRA, DoRA, LoKr "
                                       "or LoHa in kohya, LyCORIS, PEFT / diffusers or ComfyUI keys."),
                io.Model.Input("model", optional=True,
                               tooltip="The MODEL the adapter is for. Needed for files not written by Save "
                                       "adapter (their layers are matched to it); checks the architecture of "
                                       "the others."),
            ],
            outputs=[Adapter.Output(display_name="adapter")],
        )

    @classmethod
    def execute(cls, lora_name, model=None) -> io.NodeOutput:
        path = paths.lora_to_load(lora_name)
        return io.NodeOutput(checkpoint.load_adapter(path, model))


NODES = [EriCreateAdapter, EriSaveAdapter, EriLoadAdapter]
