"""Z-Image (Tongyi-MAI Z-Image / Z-Image-Turbo): ComfyUI's Lumina 2 NextDiT (comfy/ldm/lumina/model.py) with
Z-Image's sizes: a single-stream DiT over [caption tokens, 2×2 latent patches], a context refiner for the caption
(no modulation), a noise refiner and the main layers for the image (modulated by the timestep). Qwen3-4B context
only (no pooled vector), 16-channel Flux latents.

As ComfyUI samples it (comfy/supported_models.py ZImage, comfy/model_base.py Lumina2): rectified flow
(ModelType.FLOW: CONST sampling, x_t = (1 - σ)·x0 + σ·ε, x0 = x_t - σ·output) with ModelSamplingDiscreteFlow at
shift 3.0 (or a ModelSamplingAuraFlow / SD3 node's) and multiplier 1, so the model's timestep input is σ itself;
NextDiT takes t = 1 - σ internally (× its time_scale 1000) and returns the negated velocity, which is why its
output already is ε - x0 in ComfyUI's convention. The conditioning is the CLIP's context alone: ComfyUI's Z-Image
text encoder does not pad a prompt, so its attention mask is all ones and extra_conds passes no mask, only
`num_tokens` (the context's length, which NextDiT does not use).

Captions of different lengths: ComfyUI never batches conditionings of different shapes (Lumina2's c_crossattn is a
CONDRegular), it runs each alone; a micro-batch with captions of different lengths does the same, one forward per
sample, so nothing is padded or repeated into the caption.

ComfyUI's NextDiT blocks add to their residual stream out of place (x = x + ...); 0.33's in-place gate and
modulation paths run only for the omni (reference image) inputs, which training never passes.
"""
from __future__ import annotations

import re

import torch

import comfy.model_base
import comfy.supported_models

from .base import compute_dtype, to_device
from .flow import RectifiedFlow

_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+\."
_ATTENTION = re.compile(_BLOCKS + r"attention\.(qkv|out)$")
_MLP = re.compile(_BLOCKS + r"feed_forward\.w[123]$")
_MODULATION = re.compile(_BLOCKS + r"adaLN_modulation\.\d+$")

# conditioning keys of a micro-batch whose captions differ in length: one context per sample
_PER_SAMPLE = "context_"


class ZImage(RectifiedFlow):
    name = "zimage"
    text_encoder_refusal = ("training the text encoder of a Z-Image model is not supported; set text_encoder to none "
                            "(its adapter trains the diffusion model only)")

    def matches(self, base_model) -> bool:
        # Lumina 2 itself (Gemma 2 context, shift 6) is the same model class with another config
        return (type(base_model) is comfy.model_base.Lumina2
                and isinstance(base_model.model_config, comfy.supported_models.ZImage))

    preset_rules = {"attention": (_ATTENTION,), "attention_mlp": (_ATTENTION, _MLP),
                    "all_linear": (_ATTENTION, _MLP, _MODULATION)}

    def block_modules(self, diffusion_model):
        return ([f"context_refiner.{i}" for i in range(len(diffusion_model.context_refiner))] +
                [f"noise_refiner.{i}" for i in range(len(diffusion_model.noise_refiner))] +
                [f"layers.{i}" for i in range(len(diffusion_model.layers))])

    def fused_forwards(self, diffusion_model):
        # the QK norms take the strided q and k split from each qkv projection (trainers/fused.py)
        from .. import fused
        return fused.qk_norm_forwards(diffusion_model, ("q_norm", "k_norm"))

    def conditioning(self, base_model, batch, settings, device):
        dtype = compute_dtype(base_model)
        contexts = [c.context for c in batch.contexts]
        if len({c.shape[0] for c in contexts}) == 1:
            return {"context": to_device(torch.stack(contexts), device, dtype)}
        # (the keys' shapes carry the lengths: predict_from reads no tensor on the host, CUDA graphs stay possible)
        return {f"{_PER_SAMPLE}{i}": to_device(c.unsqueeze(0), device, dtype) for i, c in enumerate(contexts)}

    def predict_from(self, base_model, model_sampling, x_noisy, sigma, conditioning):
        if "context" in conditioning:
            return self._forward(base_model, model_sampling, x_noisy, sigma, conditioning["context"])
        return torch.cat([self._forward(base_model, model_sampling, x_noisy[i:i + 1], sigma[i:i + 1],
                                        conditioning[f"{_PER_SAMPLE}{i}"]) for i in range(x_noisy.shape[0])])

    @staticmethod
    def _forward(base_model, model_sampling, x_noisy, sigma, context):
        # as BaseModel._apply_model: CONST's calculate_input is x itself, the timestep σ x multiplier 1
        xc = model_sampling.calculate_input(sigma.view(-1, *[1] * (x_noisy.ndim - 1)), x_noisy)
        timestep = model_sampling.timestep(sigma).float()
        return base_model.diffusion_model(xc.to(compute_dtype(base_model)), timestep, context=context,
                                          num_tokens=context.shape[1], transformer_options={})
