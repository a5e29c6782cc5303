"""SDXL (UNet, DDPM): eps or v prediction as ComfyUI's model_sampling says, size conditioning per image."""
from __future__ import annotations

import re

import torch

import comfy.model_base
import comfy.model_sampling

from .base import Architecture, Batch, cat_contexts, compute_dtype, sample_unit_times, to_device

_ATTENTION = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_MLP = re.compile(r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")


class _VPredictionSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
    """What ComfyUI's ModelSamplingDiscrete node (sampling v_prediction, zsnr off) patches a MODEL with."""


def v_prediction_model(patcher):
    """A clone of an SDXL `patcher` that predicts v (ai-toolkit's model.is_v_pred), as ComfyUI's
    ModelSamplingDiscrete node makes it; a MODEL that predicts v already is returned as it is."""
    if predicts_v(patcher):
        return patcher
    clone = patcher.clone()
    clone.add_object_patch("model_sampling", _VPredictionSampling(patcher.model.model_config))
    return clone


def predicts_v(patcher) -> bool:
    return isinstance(patcher.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)


class SDXL(Architecture):
    name = "sdxl"

    def matches(self, base_model) -> bool:
        return isinstance(base_model, comfy.model_base.SDXL)

    preset_rules = {"attention": (_ATTENTION,), "attention_mlp": (_ATTENTION, _MLP),
                    "all_linear": (re.compile(""),)}

    def conv_modules(self, diffusion_model):
        # kohya's LoCon: the convolutions of ResBlocks, Downsample and Upsample (not the UNet's first and last)
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample
        found = []
        for name, module in diffusion_model.named_modules():
            if isinstance(module, (ResBlock, Downsample, Upsample)):
                found += [(f"{name}.{sub}", conv) for sub, conv in module.named_modules()
                          if isinstance(conv, torch.nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"]
        return found

    def block_modules(self, diffusion_model):
        # The UNet runs the layers of each TimestepEmbedSequential itself (forward_timestep_embed), so the
        # unit of recomputation is each layer: ResBlock, SpatialTransformer, Up/Downsample.
        paths = []
        for block_name in ("input_blocks", "output_blocks"):
            for i, block in enumerate(getattr(diffusion_model, block_name)):
                paths += [f"{block_name}.{i}.{j}" for j in range(len(block))]
        paths += [f"middle_block.{j}" for j in range(len(diffusion_model.middle_block))]
        return paths

    def fused_forwards(self, diffusion_model):
        import comfy.ops
        from comfy.ldm.modules.attention import GEGLU
        from .. import fused
        # Exactly these classes: a subclass may compute something else. (manual_cast's GroupNorm always casts its
        # weights, so the fused forward would only hand it back its own.)
        group_norms = (torch.nn.GroupNorm, comfy.ops.disable_weight_init.GroupNorm)
        patches = {}
        for name, module in diffusion_model.named_modules():
            if type(module) is GEGLU and fused.ENABLED["geglu"]:
                patches[name] = fused.FusedGEGLUForward(module)
            elif type(module) in group_norms and module.affine and fused.ENABLED["group_norm"]:
                patches[name] = fused.FusedGroupNormForward(module)
        return patches

    def sample_sigmas(self, model_sampling, batch, generator, settings):
        # DDPM training over the 1000 discrete timesteps: uniform by default, or t in (0, 1) mapped onto them.
        count, size = model_sampling.sigmas.shape[0], len(batch.items)
        if settings.timestep_sampling in ("auto", "uniform"):
            index = torch.randint(0, count, (size,), generator=generator)
        else:
            index = (sample_unit_times(size, generator, settings, "uniform") * count).long().clamp(0, count - 1)
        return model_sampling.sigmas.cpu()[index]

    def noisy(self, model_sampling, x0, noise, sigma):
        # ComfyUI's convention x0 + σ·ε; calculate_input divides by √(σ²+1), which is DDPM's x_t.
        return x0 + noise * sigma.view(-1, 1, 1, 1)

    def conditioning(self, base_model, batch: Batch, settings, device):
        dtype = compute_dtype(base_model)
        context = cat_contexts([c.context for c in batch.contexts])
        y = torch.cat([
            base_model.encode_adm(pooled_output=c.pooled.unsqueeze(0), width=item.original_size[0],
                                  height=item.original_size[1], crop_w=item.crop[0], crop_h=item.crop[1],
                                  target_width=item.bucket.width, target_height=item.bucket.height)
            for c, item in zip(batch.contexts, batch.items)])
        return {"context": to_device(context, device, dtype), "y": to_device(y, device, dtype)}

    def _is_v(self, model_sampling) -> bool:
        return isinstance(model_sampling, comfy.model_sampling.V_PREDICTION)

    def target(self, model_sampling, x0, noise, sigma):
        if self._is_v(model_sampling):
            s = sigma.view(-1, 1, 1, 1)
            return (noise - s * x0) / torch.sqrt(s * s + 1.0)
        return noise

    def loss_weight(self, model_sampling, sigma, settings):
        if settings.min_snr_gamma <= 0:
            return torch.ones_like(sigma)
        snr = 1.0 / (sigma * sigma)
        clipped = torch.clamp(snr, max=settings.min_snr_gamma)
        return clipped / (snr + 1.0) if self._is_v(model_sampling) else clipped / snr

    def noise_levels(self, model_sampling, sigma):
        # ComfyUI's σ is DDPM's √((1-ᾱ)/ᾱ); its timestep is the (fractional) index of σ among the 1000
        return model_sampling.timestep(sigma).float() / model_sampling.sigmas.shape[0], sigma
