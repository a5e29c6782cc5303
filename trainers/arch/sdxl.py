"""SDXL (UNet, DDPM): eps or v prediction as ComfyUI's model_sampling says, size conditioning per image."""
from __future__ import annotations

import re

import torch

import comfy.model_base
import comfy.model_sampling

from .base import Architecture, Batch, linear_modules

_ATTENTION = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_MLP = re.compile(r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")


def _cat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample contexts; lengths differ for long captions (77-token chunks), so each is repeated
    to the least common multiple, as ComfyUI does when it batches conditioning."""
    import math
    lengths = [c.shape[0] for c in contexts]
    lcm = math.lcm(*lengths)
    return torch.stack([c.repeat(lcm // c.shape[0], 1) for c in contexts])


class SDXL(Architecture):
    name = "sdxl"
    presets = ("attention", "attention_mlp", "all_linear")

    def matches(self, base_model) -> bool:
        return isinstance(base_model, comfy.model_base.SDXL)

    def target_modules(self, diffusion_model, preset):
        if preset == "attention":
            keep = _ATTENTION.search
        elif preset == "attention_mlp":
            keep = lambda n: _ATTENTION.search(n) or _MLP.search(n)
        elif preset == "all_linear":
            keep = lambda n: True
        else:
            raise ValueError(f"target preset {preset!r} is not one of {', '.join(self.presets)}")
        return linear_modules(diffusion_model, keep)

    def checkpoint_modules(self, diffusion_model):
        # The UNet runs the layers of each TimestepEmbedSequential itself (forward_timestep_embed), so the
        # unit of recomputation is each layer: ResBlock, SpatialTransformer, Up/Downsample.
        paths = []
        for block_name in ("input_blocks", "output_blocks"):
            for i, block in enumerate(getattr(diffusion_model, block_name)):
                paths += [f"{block_name}.{i}.{j}" for j in range(len(block))]
        paths += [f"middle_block.{j}" for j in range(len(diffusion_model.middle_block))]
        return paths

    def sample_sigmas(self, model_sampling, batch_size, generator):
        # DDPM training: t uniform over the 1000 discrete timesteps.
        t = torch.randint(0, model_sampling.sigmas.shape[0], (batch_size,), generator=generator)
        return model_sampling.sigmas.cpu()[t]

    def noisy(self, model_sampling, x0, noise, sigma):
        # ComfyUI's convention x0 + σ·ε; calculate_input divides by √(σ²+1), which is DDPM's x_t.
        return x0 + noise * sigma.view(-1, 1, 1, 1)

    def predict(self, base_model, x_noisy, sigma, batch: Batch):
        ms = base_model.model_sampling
        dtype = base_model.get_dtype()
        device = x_noisy.device
        xc = ms.calculate_input(sigma.view(-1, 1, 1, 1), x_noisy)
        timestep = ms.timestep(sigma).float()
        context = _cat_contexts([c.context for c in batch.contexts]).to(device)
        y = torch.cat([
            base_model.encode_adm(pooled_output=c.pooled.unsqueeze(0), width=item.original_size[0],
                                  height=item.original_size[1], crop_w=item.crop[0], crop_h=item.crop[1],
                                  target_width=item.bucket.width, target_height=item.bucket.height)
            for c, item in zip(batch.contexts, batch.items)]).to(device)
        return base_model.diffusion_model(xc.to(dtype), timestep, context=context.to(dtype), y=y.to(dtype),
                                          transformer_options={})

    def _is_v(self, base_model) -> bool:
        return isinstance(base_model.model_sampling, comfy.model_sampling.V_PREDICTION)

    def target(self, base_model, x0, noise, sigma):
        if self._is_v(base_model):
            s = sigma.view(-1, 1, 1, 1)
            return (noise - s * x0) / torch.sqrt(s * s + 1.0)
        return noise

    def loss_weight(self, base_model, sigma, min_snr_gamma):
        if min_snr_gamma <= 0:
            return torch.ones_like(sigma)
        snr = 1.0 / (sigma * sigma)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return clipped / (snr + 1.0) if self._is_v(base_model) else clipped / snr
