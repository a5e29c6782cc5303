"""LoHa (LyCORIS; PEFT's LoHaConfig): ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / rank, a Hadamard product of
two rank-r products (effective rank up to r²).

Files: `hada_w1_a` (out, rank), `hada_w1_b` (rank, in·kh·kw), `hada_w2_a`, `hada_w2_b` and `.alpha`, as
ComfyUI's loader (comfy/weight_adapter/loha.py) reads them. Initialisation is PEFT's: w1_a, w1_b, w2_a
Kaiming-uniform, w2_b zeros, so a new adapter changes nothing. The Hadamard product has no cheap
activation-side form, so the delta materialises ΔW (as LyCORIS and PEFT do).
"""
from __future__ import annotations

import math

import torch

from ..config import AdapterSpec
from . import base
from .base import AdapterLayer, check_shapes, target_shape


class LohaLayer(AdapterLayer):
    SUFFIXES = {"hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a",
                "hada_w2_b": "hada_w2_b"}

    def __init__(self, shape, rank: int, alpha: float, dtype=torch.float32):
        out_features, in_features, *kernel = shape
        fan_in = in_features * math.prod(kernel)
        super().__init__(shape, {"hada_w1_a": (out_features, rank), "hada_w1_b": (rank, fan_in),
                                 "hada_w2_a": (out_features, rank), "hada_w2_b": (rank, fan_in)}, dtype)
        self.scale = alpha / rank   # ComfyUI: alpha / hada_w1_b.shape[0]

    @classmethod
    def create(cls, spec: AdapterSpec, target, shapes, dtype) -> "LohaLayer":
        shape = target_shape(target)
        rank = shapes["hada_w1_b"][0] if shapes and "hada_w1_b" in shapes else spec.rank_for(target)
        layer = cls(shape, rank, spec.alpha_for(target), dtype)
        if shapes is not None:
            check_shapes(target[0], "LoHa", shapes, {s: tuple(p.shape) for s, p in layer.tensors().items()})
        return layer

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                base.kaiming_uniform_(p, generator)
            self.hada_w2_b.zero_()

    def diff_weight(self) -> torch.Tensor:
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return product.reshape(self.shape) * self.scale
