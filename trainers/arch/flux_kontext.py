"""Flux.1 Kontext: Flux-dev's blocks trained on edit pairs. ComfyUI loads Kontext as Flux (comfy.model_base.Flux:
the same weights, nothing in the file tells them apart), so training recognises Kontext by its data: training
images with control images (Training images' control_folder, ai-toolkit's control_path). The training image is
the target — noised, and what the loss compares against — and its control image is the clean reference.

The reference goes in as ComfyUI samples Kontext: ReferenceLatent appends the control image's latent to the
conditioning's `reference_latents`; model_base.Flux.extra_conds scales it with the latent format
(process_latent_in) into `ref_latents`; comfy/ldm/flux/model.py packs it into 2x2 patches after the noisy
latent's tokens, with position ids at index 1 and no offset (ref_latents_method "offset", the default, for a
single reference; ai-toolkit's Kontext gives its control tokens the same ids), and keeps only the noisy latent's
tokens of the output. The control image is fitted to its training image's bucket (trainers/data.py
load_control), as ai-toolkit resizes a control image to its target's size; a FluxKontextImageScale node picks
the same kind of size for sampling.

The conditioning carries the reference as one tensor (`ref_latent`, (B, C, h, w)), so a micro-batch stays a
dict of tensors (CUDA graphs, the data-parallel share); `model_inputs` turns it into the model's list.
"""
from __future__ import annotations

import torch

from .base import to_device

REFERENCE = "ref_latent"


def with_reference(inputs: dict[str, torch.Tensor], batch, device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`inputs` plus the batch's control latents (already in the model's latent scale) where it has them."""
    if batch.controls is None:
        return inputs
    return {**inputs, REFERENCE: to_device(batch.controls, device, dtype)}


def model_inputs(conditioning: dict[str, torch.Tensor]) -> dict:
    """The diffusion model's keyword arguments: ComfyUI's Flux takes reference latents as a list (`ref_latents`)."""
    if REFERENCE not in conditioning:
        return conditioning
    inputs = dict(conditioning)
    inputs["ref_latents"] = [inputs.pop(REFERENCE)]
    return inputs
