"""Flux dev / schnell: T5 context, pooled CLIP-L, the guidance input (dev), 16-channel latents in 2×2
patches; rectified flow with Flux-dev's resolution-dependent shift.

ComfyUI's Flux blocks add to their residual stream in place, which autograd cannot differentiate; their
forwards run with augmented assignments made out of place while training (trainers/blocks.py).
"""
from __future__ import annotations

import re

import torch

import comfy.model_base
import comfy.model_sampling

from . import flux_kontext
from .base import cat_contexts, compute_dtype
from .flow import RectifiedFlow, resolution_shift

_DOUBLE_ATTENTION = re.compile(r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$")
_SINGLE = re.compile(r"single_blocks\.\d+\.linear[12]$")        # fused qkv+MLP-in and proj+MLP-out
_DOUBLE_MLP = re.compile(r"double_blocks\.\d+\.(img|txt)_mlp\.[02]$")
_MODULATION = re.compile(r"(double_blocks\.\d+\.(img|txt)_mod|single_blocks\.\d+\.modulation)\.lin$")

class Flux(RectifiedFlow):
    name = "flux"
    out_of_place_blocks = True
    embedded_guidance = True
    reference_latents = True      # Flux.1 Kontext's edit pairs (trainers/arch/flux_kontext.py)
    # Flux-dev's run less weights: 4.78 GiB on an H200 (ComfyUI's estimate 0.99 GiB, its memory factor 3.1 being
    # high already); with 8, a 24 GiB budget streamed weights that fit (Architecture.activation_factor)
    activation_factor = 5

    def matches(self, base_model) -> bool:
        return type(base_model) is comfy.model_base.Flux

    preset_rules = {"attention": (_DOUBLE_ATTENTION, _SINGLE),
                    "attention_mlp": (_DOUBLE_ATTENTION, _SINGLE, _DOUBLE_MLP),
                    "all_linear": (_DOUBLE_ATTENTION, _SINGLE, _DOUBLE_MLP, _MODULATION)}

    def block_modules(self, diffusion_model):
        return ([f"double_blocks.{i}" for i in range(len(diffusion_model.double_blocks))] +
                [f"single_blocks.{i}" for i in range(len(diffusion_model.single_blocks))])

    def fused_forwards(self, diffusion_model):
        # the single blocks' GELU runs on a strided slice of their fused projection, and every block's QK norm on
        # the strided q and k of its qkv projection (trainers/fused.py)
        from .. import fused
        patches = fused.qk_norm_forwards(diffusion_model, ("query_norm", "key_norm"))
        if fused.ENABLED["gelu"]:
            patches.update({name: fused.FusedGeluTanhForward() for name, module in diffusion_model.named_modules()
                            if fused.is_gelu_tanh(module)})
        return patches

    def shift(self, model_sampling, item, settings):
        if not settings.timestep_shift and isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux):
            return resolution_shift(item.bucket.width, item.bucket.height)     # dev's own
        return super().shift(model_sampling, item, settings)                  # schnell's own is 1.0

    def unused_settings(self, base_model):
        if base_model.diffusion_model.params.guidance_embed:
            return {}
        return {"flux_guidance": "this Flux model has no guidance input (schnell)"}

    def conditioning(self, base_model, batch, settings, device):
        dtype = compute_dtype(base_model)
        inputs = {"context": cat_contexts([c.context for c in batch.contexts]).to(device, dtype),
                  "y": torch.stack([c.pooled for c in batch.contexts]).to(device, dtype)}
        if base_model.diffusion_model.params.guidance_embed:
            inputs["guidance"] = torch.full((len(batch.contexts),), settings.flux_guidance, device=device,
                                            dtype=dtype)
        return flux_kontext.with_reference(inputs, batch, device, dtype)

    def predict_from(self, base_model, model_sampling, x_noisy, sigma, conditioning):
        return super().predict_from(base_model, model_sampling, x_noisy, sigma,
                                    flux_kontext.model_inputs(conditioning))
