"""Chroma: Flux-schnell's blocks without their per-block modulation from a pooled vector. A distilled
"approximator" (distilled_guidance_layer) maps the timestep, a guidance value and each block's index to that
block's shift / scale / gate. T5 context only (no pooled CLIP), 16-channel latents in 2×2 patches.

As ComfyUI samples it (comfy/model_base.py Chroma, comfy/supported_models.py Chroma): rectified flow with
ModelSamplingFlux at its default μ = 1.15 (α = e^1.15 ≈ 3.16) for every resolution — Chroma sets no shift and
ComfyUI's Flux-dev resolution shift is not applied unless a ModelSamplingFlux node sets one — and the
guidance input 0 (extra_conds' default; a FluxGuidance node could set another).

The blocks are ComfyUI's Flux DoubleStreamBlock / SingleStreamBlock (modulation=False): the same in-place
residual updates, made out of place while training (trainers/blocks.py).
"""
from __future__ import annotations

import re

import torch

import comfy.model_base

from .base import cat_contexts, compute_dtype, to_device
from .flow import RectifiedFlow
from .flux import Flux

# The approximator: the only source of every block's modulation (Flux's per-block `*_mod.lin` is absent).
_APPROXIMATOR = re.compile(r"distilled_guidance_layer\.(in_proj|out_proj|layers\.\d+\.(in_layer|out_layer))$")


class Chroma(Flux):
    name = "chroma"
    embedded_guidance = False     # samples as ComfyUI does without a FluxGuidance node: guidance 0, as trained
    reference_latents = False     # ComfyUI's Chroma takes no reference latents

    def matches(self, base_model) -> bool:
        return type(base_model) is comfy.model_base.Chroma

    preset_rules = {**Flux.preset_rules,
                    "all_linear": Flux.preset_rules["attention_mlp"] + (_APPROXIMATOR,)}

    def shift(self, model_sampling, item, settings):
        return RectifiedFlow.shift(self, model_sampling, item, settings)     # the model's own μ, as sampled

    def unused_settings(self, base_model):
        return {}

    def conditioning(self, base_model, batch, settings, device):
        dtype = compute_dtype(base_model)
        return {"context": to_device(cat_contexts([c.context for c in batch.contexts]), device, dtype),
                "guidance": torch.zeros((len(batch.contexts),), device=device, dtype=dtype)}
