"""Flux.2 [dev]: Flux's double- and single-stream blocks (ComfyUI runs it with its Flux class and FluxParams) with
one modulation for all blocks of a stream (global_modulation: `double_stream_modulation_img` / `_txt`,
`single_stream_modulation`), SiLU-gated MLPs, no biases, four rope axes, the guidance input, and no pooled vector.
Its VAE's 32 channels come in 2×2 patches: 128-channel latents at 1/16 of the image, taken one position each
(patch_size 1).

As ComfyUI samples it (comfy/supported_models.py Flux2, comfy/model_base.py Flux2):
- rectified flow with ModelSamplingFlux at the model's μ = 2.02 (α = e^2.02 ≈ 7.5) at every resolution (what a
  KSampler uses; Flux-dev's resolution shift is not applied, and ComfyUI's Flux2Scheduler node, which picks μ
  from the size and the step count, is a sampling schedule, not the model's);
- the context is the Mistral 3 encoder's output (three of its layers side by side, no pooled output), padded at
  the front with zeros to 512 tokens as `Flux2.extra_conds` pads it (longer prompts pass as they are; in a batch
  the shorter ones are padded at the front to the longest);
- the guidance input, from Training settings' `flux_guidance`, as for Flux-dev.

The blocks are ComfyUI's Flux blocks: their in-place residual updates are made out of place while training
(trainers/blocks.py). Text-encoder adapters are not offered for its 24B Mistral encoder.
"""
from __future__ import annotations

import re

import torch

import comfy.model_base

from .base import compute_dtype, to_device
from .flow import RectifiedFlow
from .flux import Flux

# comfy/model_base.py Flux2.extra_conds: the context's length after padding
CONTEXT_TOKENS = 512
# The shared modulations (Flux.1 has one per block instead)
_GLOBAL_MODULATION = re.compile(r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin$")


class Flux2(Flux):
    name = "flux2"
    reference_latents = False     # Flux.2 edit references are not trained here (control images are refused)
    text_encoder_refusal = ("Flux.2's text encoder (Mistral 3 Small, 24B) gets no adapter here: set Create adapter's "
                            "text_encoder to none (the diffusion model's adapter trains on the cached captions)")

    def matches(self, base_model) -> bool:
        flux2 = getattr(comfy.model_base, "Flux2", None)     # a ComfyUI before Flux.2 has none
        return flux2 is not None and type(base_model) is flux2

    preset_rules = {**Flux.preset_rules,
                    "all_linear": Flux.preset_rules["attention_mlp"] + (_GLOBAL_MODULATION,)}

    def shift(self, model_sampling, item, settings):
        return RectifiedFlow.shift(self, model_sampling, item, settings)     # the model's own μ, as sampled

    def unused_settings(self, base_model):
        if base_model.diffusion_model.params.guidance_embed:
            return {}
        return {"flux_guidance": "this Flux.2 model has no guidance input (klein)"}

    def conditioning(self, base_model, batch, settings, device):
        dtype = compute_dtype(base_model)
        contexts = [c.context for c in batch.contexts]
        tokens = max(CONTEXT_TOKENS, *(c.shape[0] for c in contexts))
        context = torch.stack([torch.nn.functional.pad(c, (0, 0, tokens - c.shape[0], 0)) for c in contexts])
        inputs = {"context": to_device(context, device, dtype)}
        if base_model.diffusion_model.params.guidance_embed:
            inputs["guidance"] = torch.full((len(contexts),), settings.flux_guidance, device=device, dtype=dtype)
        return inputs
