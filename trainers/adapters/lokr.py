"""LoKr (LyCORIS; PEFT's LoKrConfig): ΔW = w1 ⊗ w2 · scale, a Kronecker product of a small and a large matrix.

Each of the layer's sizes is split in two factors (`factorization`, LyCORIS' rule: the pair nearest to
`lokr_factor`, or the most balanced with -1): out = out_l·out_k, in = in_m·in_n; w1 is (out_l, in_m), w2
(out_k, in_n[, kh, kw]). w2 is kept full rank or as w2_a (out_k, rank) · w2_b (rank, in_n·kh·kw); as in
LyCORIS and PEFT, a layer whose w2 is smaller than 2·rank is full rank anyway. The scale is what ComfyUI's
loader (comfy/weight_adapter/lokr.py) applies: alpha / rank when w2 (or a loaded file's w1) is a product,
else 1. Files: `lokr_w1`, `lokr_w2` or `lokr_w2_a` / `lokr_w2_b` (and `lokr_w1_a` / `lokr_w1_b`, which
LyCORIS' decompose_both writes, when loaded). Initialisation is PEFT's: w1 zeros, w2 Kaiming-uniform, so a
new adapter changes nothing.
"""
from __future__ import annotations

import math

import torch

from comfy.weight_adapter.base import factorization   # LyCORIS' own function, as ComfyUI ships it

from ..config import AdapterSpec, quoted
from . import base
from .base import AdapterLayer, check_shapes, target_shape


def new_shapes(shape: tuple[int, ...], rank: int, factor: int, full_w2: bool) -> dict[str, tuple[int, ...]]:
    out_features, in_features, *kernel = shape
    out_l, out_k = factorization(out_features, factor)
    in_m, in_n = factorization(in_features, factor)
    shapes = {"lokr_w1": (out_l, in_m)}
    if full_w2 or rank >= max(out_k, in_n) / 2:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    else:
        shapes["lokr_w2_a"] = (out_k, rank)
        shapes["lokr_w2_b"] = (rank, in_n * math.prod(kernel))
    return shapes


class LokrLayer(AdapterLayer):
    SUFFIXES = {"lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
                "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b"}

    def __init__(self, shape, shapes: dict[str, tuple[int, ...]], alpha: float, dtype=torch.float32):
        super().__init__(shape, shapes, dtype)
        # ComfyUI: alpha / (w2's rank if w2 is a product, else w1's if w1 is), else no scale
        rank = shapes.get("lokr_w2_b", shapes.get("lokr_w1_b", (None,)))[0]
        self.scale = alpha / rank if rank else 1.0

    @classmethod
    def create(cls, spec: AdapterSpec, target, shapes, dtype) -> "LokrLayer":
        shape = target_shape(target)
        if shapes is None:
            return cls(shape, new_shapes(shape, spec.rank_for(target), spec.lokr_factor, spec.lokr_full_w2),
                       spec.alpha_for(target), dtype)
        path = target[0]
        has = set(shapes)
        if not ({"lokr_w1"} <= has or {"lokr_w1_a", "lokr_w1_b"} <= has) or \
                not ({"lokr_w2"} <= has or {"lokr_w2_a", "lokr_w2_b"} <= has):
            raise ValueError(f"LoKr weights of layer {quoted(path)} are incomplete: found {', '.join(sorted(has))}")
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        out_features, in_features, *kernel = shape
        fits = (w1[0] * w2[0] == out_features and w1[1] * math.prod(w2[1:]) == in_features * math.prod(kernel)
                and (len(w2) == 2 or tuple(w2[2:]) == tuple(kernel)))
        if not fits or len(w1) != 2:
            raise ValueError(f"LoKr weights of layer {quoted(path)} (w1 {tuple(w1)}, w2 {tuple(w2)}) do not make its "
                             f"weight {shape}")
        layer = cls(shape, shapes, spec.alpha_for(target), dtype)
        check_shapes(path, "LoKr", shapes, {s: tuple(p.shape) for s, p in layer.tensors().items()})
        return layer

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            if self.lokr_w1 is not None:
                self.lokr_w1.zero_()
            else:
                self.lokr_w1_a.zero_()
                base.kaiming_uniform_(self.lokr_w1_b, generator)
            for p in (self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b):
                if p is not None:
                    base.kaiming_uniform_(p, generator)

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b

    def diff_weight(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(self.shape) * self.scale

    def delta(self, x: torch.Tensor, layer) -> torch.Tensor:
        if len(self.shape) == 4:
            return super().delta(x, layer)
        # (w1 ⊗ w2) x without the full matrix: x as (in_m, in_n) -> w1 · X · w2ᵀ
        w1, w2 = self._w1().to(x.dtype), self._w2().to(x.dtype)
        grid = x.unflatten(-1, (w1.shape[1], w2.shape[1]))
        return torch.einsum("...ij,pi,qj->...pq", grid, w1, w2).flatten(-2) * self.scale
