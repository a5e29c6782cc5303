"""Qwen-Image: an MMDiT (image and text streams with their own weights, joint attention, per-block modulation
from the timestep alone) on Qwen2.5-VL's hidden states, 16-channel Wan 2.1 latents with a time axis.

As ComfyUI samples it (comfy/model_base.py QwenImage, comfy/supported_models.py QwenImage):
- rectified flow (ModelType.FLUX: CONST, ModelSamplingFlux) with μ = 1.15, α = e^1.15 ≈ 3.16 at every resolution
  (no resolution-dependent shift unless a ModelSamplingFlux node sets one; a ModelSamplingAuraFlow node's shift,
  as Qwen-Image's workflows use, is the model's own shift then). resolution_shift shifts by Qwen-Image's own
  diffusers scheduler instead (as ai-toolkit's timestep_type shift does for it): μ 0.5 at 256 to 0.9 at 8192
  latent patches (α ≈ 2.0 at 1024²);
- the latent format Wan21 scales (B, 16, T, h, w) per channel; the model patches (B, 16, T, h, w) latents. An
  image is one frame: training keeps (B, 16, h, w) (arch.base.latents_in) and gives the model T = 1;
- the context is the text encoder's output (`c_crossattn`: Qwen2.5-VL's last hidden states after its chat
  template), no pooled vector, no guidance input. Captions are encoded one at a time, so none carries an
  attention mask (ComfyUI drops an all-ones one). ComfyUI never batches contexts of different lengths (it runs
  each conditioning alone); nor does training: a batch whose captions differ in length runs the model once
  per sample.

The blocks add to their residual streams out of place, so autograd differentiates them as they are. The last
block's text stream after its attention feeds nothing (the output is the image stream's): no adapter goes there.
Text-encoder training of Qwen2.5-VL is not supported.

Qwen-Image-Edit (2509, 2511): ComfyUI loads it as Qwen-Image (comfy.model_base.QwenImage; model_detection tells
2511 only by a marker tensor that sets the model's own default reference method, which the model applies itself),
so it is this architecture trained on edit pairs: training images with control images (control_folder,
ai-toolkit's control_path), as trainers/arch/flux_kontext.py trains Kontext. The control image's latent goes in as
TextEncodeQwenImageEdit's `reference_latents` (model_base.QwenImage.extra_conds: process_latent_in, then
`ref_latents`; comfy/ldm/qwen_image/model.py packs it after the noisy latent's tokens and keeps only those of the
output). TextEncodeQwenImageEdit also shows the image to Qwen2.5-VL: its caption is encoded with the image by that
node itself (or by TextEncodeQwenImageEditPlus, Qwen-Image-Edit 2509's, with the image as its image1: the dataset's
control_prompt), cached per caption and control image by cache.cache_text (`edit_caption`).
"""
from __future__ import annotations

import math
import re

import torch

import comfy.model_base

from . import flux_kontext
from .base import compute_dtype, to_device
from .flow import RectifiedFlow

_ATTENTION = re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|"
                        r"to_out\.0|to_add_out)$")
_MLP = re.compile(r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)$")
_MODULATION = re.compile(r"transformer_blocks\.\d+\.(img|txt)_mod\.1$")

# Qwen-Image's own scheduler (diffusers' scheduler_config, which ai-toolkit trains with): dynamic shifting with
# μ linear in the number of 2×2 latent patches, 0.5 at 256 to 0.9 at 8192, α = e^μ (time_shift_type exponential)
BASE_SHIFT, MAX_SHIFT, BASE_PATCHES, MAX_PATCHES = 0.5, 0.9, 256, 8192


def resolution_shift(width: int, height: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_PATCHES - BASE_PATCHES)
    return math.exp(BASE_SHIFT + slope * (width * height / (8 * 8 * 2 * 2) - BASE_PATCHES))


def sees_images(clip) -> bool:
    """Whether a CLIP's text encoder takes images with the prompt (Qwen-Image's Qwen2.5-VL): its edit model's
    captions are then encoded with the control image, as TextEncodeQwenImageEdit encodes them."""
    import comfy.text_encoders.qwen_image
    return isinstance(getattr(clip, "tokenizer", None), comfy.text_encoders.qwen_image.QwenImageTokenizer)


def edit_caption(clip, caption: str, image: torch.Tensor, node: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (1, tokens, dim), pooled or None) of a prompt and an IMAGE (1, H, W, C) as ComfyUI's `node`
    (config.CONTROL_PROMPTS: comfy_extras/nodes_qwen.py's TextEncodeQwenImageEdit, or ...Plus with the image as its
    image1) encodes them: that node runs, without a VAE (the reference latent is the cached control latent)."""
    import comfy_extras.nodes_qwen as nodes_qwen
    if node == "TextEncodeQwenImageEditPlus":
        conditioning = nodes_qwen.TextEncodeQwenImageEditPlus.execute(clip, caption, image1=image).result[0]
    else:
        conditioning = nodes_qwen.TextEncodeQwenImageEdit.execute(clip, caption, image=image).result[0]
    context, extra = conditioning[0]
    return context, extra.get("pooled_output")


class QwenImage(RectifiedFlow):
    name = "qwen_image"
    reference_latents = True      # Qwen-Image-Edit's edit pairs (the module's docstring)
    text_encoder_refusal = "training the text encoder of a Qwen-Image MODEL is not supported; set text_encoder to none"

    def matches(self, base_model) -> bool:
        return type(base_model) is comfy.model_base.QwenImage

    preset_rules = {"attention": (_ATTENTION,), "attention_mlp": (_ATTENTION, _MLP),
                    "all_linear": (_ATTENTION, _MLP, _MODULATION)}

    def target_modules(self, diffusion_model, preset):
        # The last block's text stream after attention (to_add_out, txt_mlp) feeds nothing: the model's output is
        # the image stream's. An adapter there would never learn (no gradient): none is made.
        last = len(diffusion_model.transformer_blocks) - 1
        dead = re.compile(rf"transformer_blocks\.{last}\.(attn\.to_add_out|txt_mlp\.)")
        return [(name, m) for name, m in super().target_modules(diffusion_model, preset) if not dead.match(name)]

    def shift(self, model_sampling, item, settings):
        if not settings.timestep_shift and settings.resolution_shift:
            return resolution_shift(item.bucket.width, item.bucket.height)      # its own scheduler's, not Flux's
        return super().shift(model_sampling, item, settings)

    def block_modules(self, diffusion_model):
        return [f"transformer_blocks.{i}" for i in range(len(diffusion_model.transformer_blocks))]

    def conditioning(self, base_model, batch, settings, device):
        """{"context": (B, tokens, dim)} when every caption has as many tokens, else one "context.i" (1, tokens_i,
        dim) per sample (the keys and shapes say which: a CUDA graph captures either)."""
        dtype = compute_dtype(base_model)
        contexts = [to_device(c.context, device, dtype) for c in batch.contexts]
        if len({c.shape[0] for c in contexts}) == 1:
            inputs = {"context": torch.stack(contexts)}
        else:
            inputs = {f"context.{i}": c.unsqueeze(0) for i, c in enumerate(contexts)}
        return flux_kontext.with_reference(inputs, batch, device, dtype)

    def predict_from(self, base_model, model_sampling, x_noisy, sigma, conditioning):
        xc = model_sampling.calculate_input(sigma.view(-1, *[1] * (x_noisy.ndim - 1)), x_noisy)
        xc = xc.to(compute_dtype(base_model)).unsqueeze(2)       # (B, C, 1, h, w): one frame
        timestep = model_sampling.timestep(sigma).float()
        model = base_model.diffusion_model
        reference = conditioning.get(flux_kontext.REFERENCE)
        if reference is not None and reference.ndim == 4:
            reference = reference.unsqueeze(2)                    # the Wan latent's frame axis, as VAEEncode's
        if "context" in conditioning:
            refs = {} if reference is None else {"ref_latents": [reference]}
            out = model(xc, timestep, context=conditioning["context"], transformer_options={}, **refs)
        else:
            out = torch.cat([model(xc[i:i + 1], timestep[i:i + 1], context=conditioning[f"context.{i}"],
                                   transformer_options={},
                                   **({} if reference is None else {"ref_latents": [reference[i:i + 1]]}))
                             for i in range(xc.shape[0])])
        return out.squeeze(2)
