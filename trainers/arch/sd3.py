"""SD 3.5 Medium / Large (MMDiT): CLIP-L + CLIP-G + T5 context and pooled CLIP output, rectified flow with
the model's shift (3.0, or what a ModelSamplingSD3 node set)."""
from __future__ import annotations

import re

import torch

import comfy.model_base

from .base import cat_contexts, compute_dtype
from .flow import RectifiedFlow

# x_block.attn2 is SD 3.5 Medium's extra self-attention (MMDiT-X).
_ATTENTION = re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\.attn2?\.(qkv|proj)$")
_MLP = re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\.mlp\.(fc1|fc2)$")
_MODULATION = re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\.adaLN_modulation\.1$")


class SD3(RectifiedFlow):
    name = "sd3"
    # SD 3.5 Large's run less weights: 3.24 GiB on an H200 (ComfyUI's estimate 0.38 GiB: x8.4)
    activation_factor = 9

    def matches(self, base_model) -> bool:
        return isinstance(base_model, comfy.model_base.SD3)

    preset_rules = {"attention": (_ATTENTION,), "attention_mlp": (_ATTENTION, _MLP),
                    "all_linear": (_ATTENTION, _MLP, _MODULATION)}

    def block_modules(self, diffusion_model):
        return [f"joint_blocks.{i}" for i in range(len(diffusion_model.joint_blocks))]

    def fused_forwards(self, diffusion_model):
        # SD 3.5's QK norms (RMSNorm) take the strided q and k of each qkv projection (trainers/fused.py)
        from .. import fused
        return fused.qk_norm_forwards(diffusion_model, ("ln_q", "ln_k"))

    def conditioning(self, base_model, batch, settings, device):
        dtype = compute_dtype(base_model)
        return {"context": cat_contexts([c.context for c in batch.contexts]).to(device, dtype),
                "y": torch.stack([c.pooled for c in batch.contexts]).to(device, dtype)}
