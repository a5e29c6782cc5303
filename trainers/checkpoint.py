"""Saving an adapter as a file ComfyUI's LoRA loaders read, with its full training state beside it."""
from __future__ import annotations

import json
import os

import torch

from . import adapters
from .config import AdapterSpec
from .files import json_meta, load_tensors, save_tensors, state_path_for
from .state import (DTYPES, AdapterState, LossHistory, optimizer_from_tensors, optimizer_to_tensors,
                    spec_from_json, spec_to_json)

FORMAT = "eridiffusion.adapter.v1"


def make_spec(patcher, kind: str, rank: int, alpha: float, preset: str, seed: int, dtype: str) -> AdapterSpec:
    from .arch import detect
    arch = detect(patcher)
    targets = []
    for path, module in arch.target_modules(patcher.model.diffusion_model, preset):
        out_features, in_features = module.weight.shape[:2]
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} is larger than layer {path!r} ({in_features} -> {out_features}); "
                             f"choose rank <= {min(in_features, out_features)}")
        targets.append((path, int(in_features), int(out_features)))
    if not targets:
        raise ValueError(f"target preset {preset!r} matches no layer of this {arch.name} MODEL")
    return AdapterSpec(arch=arch.name, kind=kind, rank=rank, alpha=alpha, preset=preset, seed=seed, dtype=dtype,
                       targets=tuple(targets))


def adapter_metadata(state: AdapterState) -> dict[str, str]:
    spec = state.spec
    return json_meta({
        "format": FORMAT,
        "eri.architecture": spec.arch, "eri.adapter": spec.kind, "eri.rank": spec.rank,
        "eri.alpha": spec.alpha, "eri.preset": spec.preset, "eri.steps": state.step,
        "eri.settings": state.settings or {},
        "eri.spec": spec_to_json(spec),
        # kohya / ai-toolkit readers look for these
        "ss_network_module": "networks.lora", "ss_network_dim": spec.rank, "ss_network_alpha": spec.alpha,
        "ss_base_model_version": spec.arch, "ss_steps": state.step,
    })


def save_adapter(state: AdapterState, path: str, save_dtype: str = "fp16") -> str:
    """Write the adapter (ComfyUI-loadable keys) and `<name>.eri-state` beside it; returns path."""
    method = adapters.method(state.spec.kind)
    save_tensors(path, method.to_file_tensors(state.spec, state.weights, DTYPES[save_dtype]),
                 adapter_metadata(state))
    tensors = {f"weight.{k}": v for k, v in state.weights.items()}
    meta = {"format": FORMAT + ".state", "spec": spec_to_json(state.spec), "step": state.step,
            "cursor": state.cursor, "optimizer_name": state.optimizer_name or "",
            "history": {"steps": state.history.steps, "losses": state.history.losses,
                        "learning_rates": state.history.learning_rates},
            "settings": state.settings or {}}
    if state.optimizer is not None:
        optimizer_tensors, optimizer_meta = optimizer_to_tensors(state.optimizer)
        tensors.update(optimizer_tensors)
        meta["optimizer"] = optimizer_meta
    if state.rng is not None:
        tensors["rng"] = state.rng
    save_tensors(state_path_for(path), tensors, json_meta(meta))
    return path


def load_adapter(path: str) -> AdapterState:
    """Resume from a file written by save_adapter: the full state if its .state file is beside it, otherwise
    the weights alone (training continues with a fresh optimizer)."""
    state_path = state_path_for(path)
    if os.path.isfile(state_path):
        tensors, meta = load_tensors(state_path)
        spec = spec_from_json(meta["spec"])
        weights = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
        history = json.loads(meta.get("history", "{}"))
        optimizer = None
        if "optimizer" in meta:
            optimizer = optimizer_from_tensors(tensors, json.loads(meta["optimizer"]))
        return AdapterState(
            spec, weights, step=int(meta["step"]), cursor=int(meta["cursor"]), optimizer=optimizer,
            optimizer_name=meta.get("optimizer_name") or None, rng=tensors.get("rng"),
            history=LossHistory(tuple(history.get("steps", ())), tuple(history.get("losses", ())),
                                tuple(history.get("learning_rates", ()))),
            settings=json.loads(meta.get("settings", "{}")) or None)
    tensors, meta = load_tensors(path)
    if "eri.spec" not in meta:
        raise ValueError(f"{os.path.basename(path)!r} was not written by EriDiffusion's Save adapter (no "
                         f"eri.spec metadata); only EriDiffusion adapter files can be resumed for now")
    spec = spec_from_json(meta["eri.spec"])
    weights = adapters.method(spec.kind).from_file_tensors(spec, tensors)
    weights = {k: v.to(DTYPES[spec.dtype]) for k, v in weights.items()}
    return AdapterState(spec, weights, step=int(meta.get("eri.steps", 0)))
