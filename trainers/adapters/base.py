"""What every adapter method provides, and how an adapter is put into a ComfyUI MODEL.

Adapters are activation-side: a patched layer computes `base(x) + delta(x)`, where `base` is the layer's
own forward (so ComfyUI's per-layer casting of fp8 / lowvram weights still applies) and `delta` is the
adapter's. They are installed as ModelPatcher object patches on `diffusion_model.<path>.forward`, which
ComfyUI applies only while that clone is loaded and restores on unload: the shared torch module, its
parameter paths and every other clone of the MODEL stay as they were.
"""
from __future__ import annotations

import copy

import torch


class AdapterLayer(torch.nn.Module):
    """The trainable part of one adapted layer. Subclasses define `delta(x)` and their parameters."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PatchedForward:
    """Replaces a layer's `forward` while its clone is loaded: base output plus the adapter's delta."""

    def __init__(self, layer: torch.nn.Module, adapter: AdapterLayer):
        self.layer = layer
        self.adapter = adapter

    def __call__(self, x, *args, **kwargs):
        out = type(self.layer).forward(self.layer, x, *args, **kwargs)
        return out + self.adapter.delta(x).to(out.dtype)


class DeviceCached(torch.nn.Module):
    """Inference copy of an adapter layer for a sampled MODEL: weights moved to the input's device and
    dtype once and kept there, so sampling pays no per-call copies."""

    def __init__(self, adapter: AdapterLayer):
        super().__init__()
        self.source = adapter
        self.copies: dict = {}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        layer = self.copies.get(key)
        if layer is None:
            layer = copy.deepcopy(self.source).to(device=x.device, dtype=x.dtype)
            self.copies = {key: layer}   # one device/dtype at a time
        return layer.delta(x)


def object_patch_key(path: str) -> str:
    return f"diffusion_model.{path}.forward"


def install(patcher, layers: dict[str, AdapterLayer]) -> None:
    """Attach `layers` (module path -> adapter layer) to a ModelPatcher clone as object patches."""
    root = patcher.model.diffusion_model
    for path, adapter in layers.items():
        patcher.add_object_patch(object_patch_key(path), PatchedForward(root.get_submodule(path), adapter))
