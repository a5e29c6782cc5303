"""Saving an adapter as a file ComfyUI's LoRA loaders read, with its full training state beside it."""
from __future__ import annotations

import glob
import json
import os
import re

import torch

from . import adapters
from .config import AdapterSpec
from .files import json_meta, load_tensors, save_tensors, state_path_for
from .state import (DTYPES, AdapterState, LossHistory, optimizer_from_tensors, optimizer_to_tensors,
                    spec_from_json, spec_to_json)

FORMAT = "eridiffusion.adapter.v1"


def target_of(path: str, module: torch.nn.Module) -> tuple:
    """AdapterSpec target of a layer: (path, in, out) for linear, (path, in, out, kh, kw) for conv."""
    if isinstance(module, torch.nn.Conv2d):
        out_channels, in_channels, kh, kw = module.weight.shape
        return (path, int(in_channels), int(out_channels), int(kh), int(kw))
    out_features, in_features = module.weight.shape[:2]
    return (path, int(in_features), int(out_features))


def make_spec(patcher, kind: str, rank: int, alpha: float, preset: str, seed: int, dtype: str, dora: bool = False,
              lokr_factor: int = -1, lokr_full_w2: bool = False, conv: bool = False, conv_rank: int = 0,
              conv_alpha: float = 0.0) -> AdapterSpec:
    from .arch import detect
    arch = detect(patcher)
    adapters.method(kind)
    root = patcher.model.diffusion_model
    modules = list(arch.target_modules(root, preset))
    if not modules:
        raise ValueError(f"target preset {preset!r} matches no layer of this {arch.name} MODEL")
    if conv:
        convs = arch.conv_modules(root)
        if not convs:
            raise ValueError(f"conv_layers is on but this {arch.name} MODEL has no UNet convolution layers "
                             f"(ResBlocks, Up/Downsample); turn conv_layers off")
        modules += convs
    spec = AdapterSpec(arch=arch.name, kind=kind, rank=rank, alpha=alpha, preset=preset, seed=seed, dtype=dtype,
                       targets=tuple(target_of(path, module) for path, module in modules), dora=dora,
                       lokr_factor=lokr_factor, lokr_full_w2=lokr_full_w2, conv=conv, conv_rank=conv_rank,
                       conv_alpha=conv_alpha)
    if kind != "lokr":   # LoKr's rank only shapes w2, which falls back to full rank where it is too large
        for target in spec.targets:
            out_features, fan_in = target[2], target[1] * (target[3] * target[4] if len(target) == 5 else 1)
            r = spec.rank_for(target)
            if r > min(fan_in, out_features):
                name = "conv_rank" if len(target) == 5 and spec.conv_rank else "rank"
                raise ValueError(f"{name} {r} is larger than layer {target[0]!r} ({fan_in} -> {out_features}); "
                                 f"choose {name} <= {min(fan_in, out_features)}")
    return spec


def adapter_metadata(state: AdapterState) -> dict[str, str]:
    spec = state.spec
    return json_meta({
        "format": FORMAT,
        "eri.architecture": spec.arch, "eri.adapter": spec.kind, "eri.rank": spec.rank,
        "eri.alpha": spec.alpha, "eri.preset": spec.preset, "eri.steps": state.step,
        "eri.settings": state.settings or {},
        "eri.spec": spec_to_json(spec),
        # kohya / ai-toolkit readers look for these
        "eri.dora": spec.dora,
        "ss_network_module": "networks.lora" if spec.kind == "lora" and not spec.dora else "lycoris.kohya",
        "ss_network_args": {"algo": spec.kind, "dora_wd": spec.dora, "factor": spec.lokr_factor,
                            "full_matrix": spec.lokr_full_w2,
                            **({"conv_dim": spec.conv_rank or spec.rank, "conv_alpha": spec.conv_alpha or spec.alpha}
                               if spec.conv else {})},
        "ss_network_dim": spec.rank, "ss_network_alpha": spec.alpha,
        "ss_base_model_version": spec.arch, "ss_steps": state.step,
    })


def save_adapter(state: AdapterState, path: str, save_dtype: str = "fp16") -> str:
    """Write the adapter (ComfyUI-loadable keys) and `<name>.eri-state` beside it; returns path."""
    bad = [k for k, v in state.weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the adapter has NaN/inf weights at step {state.step} ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                         f"not saved, so {os.path.basename(path)!r} is not overwritten. Train again from the last "
                         f"good save with a lower learning rate")
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


def load_adapter(path: str, patcher=None) -> AdapterState:
    """Resume from a file written by save_adapter: the full state if its .state file is beside it, otherwise
    the weights alone (training continues with a fresh optimizer). A file of another trainer (kohya,
    LyCORIS, PEFT / diffusers or ComfyUI keys) needs the MODEL (`patcher`) to match its layers to."""
    name = os.path.basename(path)
    state_path = state_path_for(path)
    if os.path.isfile(state_path):
        tensors, meta = load_tensors(state_path)
        spec = spec_from_json(meta["spec"])
        _check_arch(name, spec, patcher)
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
    if "eri.spec" in meta:
        spec = spec_from_json(meta["eri.spec"])
        _check_arch(name, spec, patcher)
        weights = adapters.method(spec.kind).from_file_tensors(spec, tensors)
        step = int(meta.get("eri.steps", 0))
    elif patcher is None:
        raise ValueError(f"{name!r} was not written by EriDiffusion's Save adapter: connect the MODEL input of "
                         f"Load adapter so its layers can be matched to the model")
    else:
        from .importer import import_adapter
        try:
            spec, weights = import_adapter(path, tensors, patcher)
        except ValueError as e:
            raise ValueError(str(e) if name in str(e) else f"{name}: {e}") from None
        step = 0
    weights = {k: v.to(DTYPES[spec.dtype]) for k, v in weights.items()}
    return AdapterState(spec, weights, step=step)


def _check_arch(name: str, spec: AdapterSpec, patcher) -> None:
    if patcher is None:
        return
    from .arch import detect
    arch = detect(patcher).name
    if spec.arch != arch:
        raise ValueError(f"{name!r} is a {spec.arch} adapter but the MODEL connected to Load adapter is {arch}: "
                         f"connect a {spec.arch} MODEL, or choose an adapter made for {arch}")


def saved_steps(path_of_step) -> dict[int, str]:
    """Adapter files of one save series: `path_of_step(step)` names them; returns {step: path} of those on disk."""
    pattern = path_of_step(0)
    folder, name = os.path.split(pattern)
    stem = name[: -len("000000.safetensors")]
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(stem) + "*.safetensors")):
        match = re.fullmatch(re.escape(stem) + r"(\d{6,})\.safetensors", os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    return found


def prune_saves(path_of_step, keep: int) -> list[str]:
    """Delete all but the newest `keep` saves of a series (adapter and state files); returns what went."""
    steps = sorted(saved_steps(path_of_step))
    removed = []
    for step in steps[:-keep] if keep > 0 else []:
        for path in (path_of_step(step), state_path_for(path_of_step(step))):
            if os.path.exists(path):
                os.remove(path)
                removed.append(path)
    return removed
