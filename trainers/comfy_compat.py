"""What differs between the ComfyUI versions the pack supports (0.3.75 and 0.33): the one place that knows.

Each difference is found from ComfyUI itself (a field or attribute that exists or not), never from a
version string, so a ComfyUI between the two works as far as it has each feature. Imports nothing from the
pack: the test-only node pack (tests/eri_test_nodes) loads this file by its path.
"""
from __future__ import annotations

import contextlib
import dataclasses

import comfy.model_management

# Flux.1's value of the fields that newer ComfyUI's FluxParams requires and older ones do not accept
# (model_detection.py gives a Flux.1 checkpoint these): `txt_ids_dims` (0.33) lists the text position axes
# that count up; Flux.1 has none.
_FLUX_1_FIELDS = {"txt_ids_dims": []}


def flux_config(config: dict) -> dict:
    """A Flux.1 unet config (as model_detection finds it in 0.3.75) completed for this ComfyUI's FluxParams."""
    import comfy.ldm.flux.model   # here, not at the top: the training loop imports this module too
    accepted = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**{k: v for k, v in _FLUX_1_FIELDS.items() if k in accepted}, **config}


@contextlib.contextmanager
def training_mode():
    """ComfyUI's own flag for "a model is being trained" (0.33: `model_management.in_training`), set for the
    block: with it, models and ops take their autograd-safe paths (Flux's rotary embedding without
    comfy-kitchen's inference kernel, no INT8 activation fusion). Restored afterwards, also on errors and
    Cancel; ComfyUI without the flag needs nothing."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before
