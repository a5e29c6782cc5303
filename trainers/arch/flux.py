"""Flux dev / schnell: T5 context, pooled CLIP-L, the guidance input (dev), 16-channel latents in 2×2
patches; rectified flow with Flux-dev's resolution-dependent shift.

ComfyUI's Flux blocks add to their residual stream in place, which autograd cannot differentiate; their
forwards run with augmented assignments made out of place while training (trainers/blocks.py).
"""
from __future__ import annotations

import re
import sys

import torch

import comfy.model_base
import comfy.model_sampling

from . import flux_kontext
from .base import cat_contexts, compute_dtype, to_device
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

    def training_block_forward(self, block):
        from .. import fused
        from ..comfy_compat import known_flux_block
        if not fused.ENABLED["concat"] or not known_flux_block(block):
            return None
        if hasattr(block, "img_attn"):
            return None if getattr(block, "flipped_img_txt", False) else double_block_forward
        if getattr(block, "yak_mlp", False) or not fused.is_gelu_tanh(block.mlp_act):
            return None
        return single_block_forward

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
        inputs = {"context": to_device(cat_contexts([c.context for c in batch.contexts]), device, dtype),
                  "y": to_device(torch.stack([c.pooled for c in batch.contexts]), device, dtype)}
        if base_model.diffusion_model.params.guidance_embed:
            inputs["guidance"] = torch.full((len(batch.contexts),), settings.flux_guidance, device=device,
                                            dtype=dtype)
        return flux_kontext.with_reference(inputs, batch, device, dtype)

    def predict_from(self, base_model, model_sampling, x_noisy, sigma, conditioning):
        return super().predict_from(base_model, model_sampling, x_noisy, sigma,
                                    flux_kontext.model_inputs(conditioning))


# ComfyUI's Flux blocks while training, their concatenations fused (trainers/fused.py). Each reproduces ComfyUI's
# forward statement by statement (0.3.75's and 0.33's: comfy_compat.known_flux_block), its residual additions out
# of place (as trainers/blocks.py makes them), so results are its own bit for bit; ComfyUI's functions are looked
# up in the block's module at each call, so what patches them (the fused rotary embedding) applies here too.
def double_block_forward(block, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                         transformer_options={}):
    """DoubleStreamBlock.forward with the text and image q (and k) normalised straight into their concatenation:
    torch.cat of the normalised parts was a full copy of q and k, twice a step under checkpointing."""
    from .. import fused
    patches = transformer_options.get("patches", {})
    if "attn1_patch" in patches or "attn1_output_patch" in patches:     # (0.33's; 0.3.75 has none)
        return type(block).forward(block, img, txt, vec, pe, attn_mask, modulation_dims_img, modulation_dims_txt,
                                   transformer_options)
    layers = sys.modules[type(block).__module__]
    apply_mod, attention = layers.apply_mod, layers.attention
    if block.modulation:
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
    else:
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec

    img_qkv = block.img_attn.qkv(apply_mod(block.img_norm1(img), (1 + img_mod1.scale), img_mod1.shift,
                                           modulation_dims_img))
    txt_qkv = block.txt_attn.qkv(apply_mod(block.txt_norm1(txt), (1 + txt_mod1.scale), txt_mod1.shift,
                                           modulation_dims_txt))
    # ComfyUI: each viewed as heads, QKNorm of each stream, torch.cat of q, k and v (text first)
    q, k, v = fused.joint_attention_inputs(txt_qkv, img_qkv, block.num_heads, block.txt_attn.norm,
                                           block.img_attn.norm)
    del img_qkv, txt_qkv

    attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
    del q, k, v
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

    img = img + apply_mod(block.img_attn.proj(img_attn), img_mod1.gate, None, modulation_dims_img)
    del img_attn
    img = img + apply_mod(block.img_mlp(apply_mod(block.img_norm2(img), (1 + img_mod2.scale), img_mod2.shift,
                                                  modulation_dims_img)), img_mod2.gate, None, modulation_dims_img)
    txt = txt + apply_mod(block.txt_attn.proj(txt_attn), txt_mod1.gate, None, modulation_dims_txt)
    del txt_attn
    txt = txt + apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift,
                                                  modulation_dims_txt)), txt_mod2.gate, None, modulation_dims_txt)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_block_forward(block, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
    """SingleStreamBlock.forward (GELU MLP) with the MLP's activation written straight into its concatenation with
    the attention output: torch.cat copied that activation, 4× the hidden width, twice a step under checkpointing."""
    from .. import fused
    patches = transformer_options.get("patches", {})
    if "attn1_patch" in patches or "attn1_output_patch" in patches:
        return type(block).forward(block, x, vec, pe, attn_mask, modulation_dims, transformer_options)
    layers = sys.modules[type(block).__module__]
    if block.modulation:
        mod, _ = block.modulation(vec)
    else:
        mod = vec
    projection = block.linear1(layers.apply_mod(block.pre_norm(x), (1 + mod.scale), mod.shift, modulation_dims))
    # ComfyUI: torch.split into qkv and the MLP's input, qkv viewed as heads, QKNorm
    q, k, v, mlp, gradient = fused.single_block_inputs(projection, 3 * block.hidden_size, block.num_heads,
                                                       block.norm)
    del projection
    attn = layers.attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
    del q, k, v
    output = block.linear2(fused.cat_gelu_tanh(attn, mlp, block.mlp_act, gradient))
    x = x + layers.apply_mod(output, mod.gate, None, modulation_dims)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
