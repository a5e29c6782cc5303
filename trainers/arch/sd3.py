"""SD 3.5 Medium / Large (MMDiT): CLIP-L + CLIP-G + T5 context and pooled CLIP output, rectified flow with
the model's shift (3.0, or what a ModelSamplingSD3 node set)."""
from __future__ import annotations

import re
import sys

import torch

import comfy.model_base

from .base import cat_contexts, compute_dtype, to_device
from .flow import RectifiedFlow

# x_block.attn2 is SD 3.5 Medium's extra self-attention (MMDiT-X).
_ATTENTION = re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\.attn2?\.(qkv|proj)$")
_MLP = re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\.mlp\.(fc1|fc2)$")
_MODULATION = re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\.adaLN_modulation\.1$")


class SD3(RectifiedFlow):
    name = "sd3"
    # SD 3.5 Large's run less weights: 3.24 GiB on an H200 (ComfyUI's estimate 0.38 GiB: x8.4)
    activation_factor = 9
    # MMDiT's PatchEmbed gives the blocks x as `flatten(2).transpose(1, 2)` of a convolution's output, and every
    # residual add keeps that layout, so each LayerNorm copied its input (forward, recomputation and backward) and
    # each add ran on torch's strided path: 17 ms of copies and 8 of adds in an SD 3.5 Large FP8 step (H200)
    contiguous_block_inputs = True

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

    def training_block_forward(self, block):
        from .. import fused
        from ..comfy_compat import known_mmdit_block
        if not fused.ENABLED["concat"] or not known_mmdit_block(block) or block.x_block.x_block_self_attn:
            return None     # (SD 3.5 Medium's MMDiT-X blocks: their own forward)
        return joint_block_forward

    def conditioning(self, base_model, batch, settings, device):
        dtype = compute_dtype(base_model)
        return {"context": to_device(cat_contexts([c.context for c in batch.contexts]), device, dtype),
                "y": to_device(torch.stack([c.pooled for c in batch.contexts]), device, dtype)}


# MMDiT's JointBlock while training, its q, k and v written in place (trainers/fused.py). It reproduces ComfyUI's
# JointBlock.forward -> block_mixing -> _block_mixing with DismantledBlock.pre_attention and
# SelfAttention.pre_attention statement by statement (comfy_compat.known_mmdit_block), so results are its own bit
# for bit; ComfyUI's functions and methods are looked up at each call.
def joint_block_forward(block, *args, use_checkpoint=True, **kwargs):
    """JointBlock.forward, the context's and x's q, k and v written straight into their concatenations and each qkv
    projection's gradient in one piece (fused.mmdit_joint_attention_inputs)."""
    if use_checkpoint:      # (ComfyUI's own checkpoint: MMDiT's use_checkpoint, off unless set)
        return type(block).forward(block, *args, use_checkpoint=use_checkpoint, **kwargs)
    return _block_mixing(*args, context_block=block.context_block, x_block=block.x_block, **kwargs)


def _qkv_projection(block, x, c):
    """DismantledBlock.pre_attention up to its attention's qkv Linear: (its output, the intermediates)."""
    mmdit = sys.modules[type(block).__module__]
    if not block.pre_only:
        if not block.scale_mod_only:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        else:
            shift_msa = None
            shift_mlp = None
            scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(4, dim=1)
        qkv = block.attn.qkv(mmdit.modulate(block.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    if not block.scale_mod_only:
        shift_msa, scale_msa = block.adaLN_modulation(c).chunk(2, dim=1)
    else:
        shift_msa = None
        scale_msa = block.adaLN_modulation(c)
    return block.attn.qkv(mmdit.modulate(block.norm1(x), shift_msa, scale_msa)), None


def _block_mixing(context, x, context_block, x_block, c, transformer_options={}):
    from .. import fused
    mmdit = sys.modules[type(x_block).__module__]
    context_qkv, context_intermediates = _qkv_projection(context_block, context, c)
    x_qkv, x_intermediates = _qkv_projection(x_block, x, c)
    context_length = context_qkv.shape[1]
    qkv = fused.mmdit_joint_attention_inputs(context_qkv, x_qkv, context_block.attn, x_block.attn)
    del context_qkv, x_qkv
    attn = mmdit.optimized_attention(qkv[0], qkv[1], qkv[2], heads=x_block.attn.num_heads,
                                     transformer_options=transformer_options)
    del qkv
    context_attn, x_attn = attn[:, :context_length], attn[:, context_length:]
    if not context_block.pre_only:
        context = context_block.post_attention(context_attn, *context_intermediates)
    else:
        context = None
    return context, x_block.post_attention(x_attn, *x_intermediates)
