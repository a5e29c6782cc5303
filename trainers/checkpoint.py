"""Saving an adapter as a file ComfyUI's LoRA loaders read, with its full training state beside it.

An adapter `<name>.safetensors` and its state `<name>.eri-state` are one unit: the state records the sha256 of
the adapter file it was saved with, both are written completely before either is renamed into place, and the
state is renamed first (a new save's adapter only ever appears with its state). Loading refuses a state that
belongs to another adapter file and warns when an adapter of ours has no state.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from . import adapters
from .config import ARCH_LABELS, AdapterSpec, quoted
from .files import (commit, file_sha256, json_meta, load_tensors, remove_leftovers, stage_bytes, state_path_for,
                    tensor_bytes)
from .state import (DTYPES, AdapterState, LossHistory, optimizer_from_tensors, optimizer_to_tensors,
                    spec_from_json, spec_to_json)

FORMAT = "eridiffusion.adapter.v1"
STATE_FORMAT = FORMAT + ".state"
# Loss points a state keeps (older ones thinned, see LossHistory.thinned): ~2.5 MB of header, far below
# safetensors' 100 MB limit, which a full history reached at ~2.1M steps (and every later save failed).
MAX_SAVED_HISTORY = 50_000
# the longest file name (one path component, in bytes) that common file systems take
NAME_MAX = 255
# save series `<prefix>_v2` ... of one prefix that prefix_for_run looks at before giving up
MAX_VERSIONS = 1000
# what a run id may look like (uuid4 hex when this pack makes one): anything else in a file is not used
RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def target_of(path: str, module: torch.nn.Module) -> tuple:
    """AdapterSpec target of a layer: (path, in, out) for linear, (path, in, out, kh, kw) for conv."""
    if isinstance(module, torch.nn.Conv2d):
        out_channels, in_channels, kh, kw = module.weight.shape
        return (path, int(in_channels), int(out_channels), int(kh), int(kw))
    out_features, in_features = module.weight.shape[:2]
    return (path, int(in_features), int(out_features))


def make_spec(patcher, kind: str, rank: int, alpha: float, preset: str, seed: int, dtype: str, dora: bool = False,
              lokr_factor: int = -1, lokr_full_w2: bool = False, conv: bool = False, conv_rank: int = 0,
              conv_alpha: float = 0.0, text_encoder: str = "none", clip=None) -> AdapterSpec:
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
    elif conv_rank or conv_alpha:
        logging.warning("EriDiffusion: conv_rank %s and conv_alpha %s are ignored: they apply with conv_layers "
                        "on (SDXL only), which is off", conv_rank, conv_alpha)
    if text_encoder != "none" and not arch.text_encoder_training:
        raise ValueError(f"text_encoder {text_encoder}: training the text encoder of a {ARCH_LABELS[arch.name]} "
                         f"model is not supported; set text_encoder to none (its adapter trains the diffusion "
                         f"model only)")
    if text_encoder != "none":
        from . import text_encoder as te
        if text_encoder not in te.ENCODERS:
            raise ValueError(f"text_encoder must be one of {', '.join(te.ENCODERS)}, got {quoted(text_encoder)}")
        if clip is None:
            raise ValueError(f"text_encoder is {text_encoder}: connect the CLIP (from the checkpoint loader) to "
                             f"Create adapter's clip input, or set text_encoder to none")
        te_modules = te.target_modules(clip, text_encoder)
        if not te_modules:
            raise ValueError(f"text_encoder {text_encoder} matches no layer of this CLIP (it has no "
                             f"{' / '.join(te.ENCODERS[text_encoder])}): choose another text_encoder option")
        modules += te_modules
    spec = AdapterSpec(arch=arch.name, kind=kind, rank=rank, alpha=alpha, preset=preset, seed=seed, dtype=dtype,
                       targets=tuple(target_of(path, module) for path, module in modules), dora=dora,
                       lokr_factor=lokr_factor, lokr_full_w2=lokr_full_w2, conv=conv, conv_rank=conv_rank,
                       conv_alpha=conv_alpha, text_encoder=text_encoder)
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
        **({"eri.run_id": state.run_id} if state.run_id else {}),
        # kohya / ai-toolkit readers look for these
        "eri.dora": spec.dora, "eri.ema": state.ema is not None, "eri.text_encoder": spec.text_encoder,
        "ss_network_train_unet_only": spec.text_encoder == "none",
        "ss_network_module": "networks.lora" if spec.kind == "lora" and not spec.dora else "lycoris.kohya",
        "ss_network_args": {"algo": spec.kind, "dora_wd": spec.dora, "factor": spec.lokr_factor,
                            "full_matrix": spec.lokr_full_w2,
                            **({"conv_dim": spec.conv_rank or spec.rank, "conv_alpha": spec.conv_alpha or spec.alpha}
                               if spec.conv else {})},
        "ss_network_dim": spec.rank, "ss_network_alpha": spec.alpha,
        "ss_base_model_version": spec.arch, "ss_steps": state.step,
    })


def save_adapter(state: AdapterState, path: str, save_dtype: str = "fp16") -> str:
    """Write the adapter (ComfyUI-loadable keys) and `<name>.eri-state` beside it as one unit; returns path.

    Both files are written to temporary names first (where a full disk shows: then neither changes), then
    the state is renamed into place and then the adapter. A process killed between the renames leaves a new
    step's state without its adapter (the save is simply missing) or, re-saving a step, the new state beside
    the old adapter, which load_adapter recognises by the adapter hash the state records."""
    bad = [k for weights in (state.weights, state.ema or {}) for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the adapter has NaN/inf weights at step {state.step} ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                         f"not saved, so {os.path.basename(path)!r} is not overwritten. Train again from the last "
                         f"good save with a lower learning rate")
    method = adapters.method(state.spec.kind)
    # With EMA the file is the EMA (what users load); the state keeps the raw weights to train on from.
    adapter_data = tensor_bytes(method.to_file_tensors(state.spec, state.applied_weights, DTYPES[save_dtype]),
                                adapter_metadata(state))
    tensors = {f"weight.{k}": v for k, v in state.weights.items()}
    tensors.update({f"ema.{k}": v for k, v in (state.ema or {}).items()})
    history = state.history.thinned(MAX_SAVED_HISTORY)
    meta = {"format": STATE_FORMAT, "spec": spec_to_json(state.spec), "step": state.step,
            "cursor": state.cursor, "optimizer_name": state.optimizer_name or "",
            "history": {"steps": history.steps, "losses": history.losses,
                        "learning_rates": history.learning_rates, "val_steps": history.val_steps,
                        "val_losses": history.val_losses},
            "settings": state.settings or {},
            "adapter_sha256": hashlib.sha256(adapter_data).hexdigest()}
    if state.run_id:
        meta["run_id"] = state.run_id
    if state.optimizer is not None:
        optimizer_tensors, optimizer_meta = optimizer_to_tensors(state.optimizer)
        tensors.update(optimizer_tensors)
        meta["optimizer"] = optimizer_meta
    if state.rng is not None:
        tensors["rng"] = state.rng
    state_data = tensor_bytes(tensors, json_meta(meta))
    state_path = state_path_for(path)
    remove_leftovers(os.path.dirname(os.path.abspath(path)), targets=(path, state_path))
    staged_adapter = stage_bytes(path, adapter_data)
    try:
        staged_state = stage_bytes(state_path, state_data)
    except BaseException:
        staged_adapter.discard()
        raise
    commit(staged_state, staged_adapter)
    return path


class _Damaged(Exception):
    """Why a training state cannot be used (a short reason, values quoted)."""


def _damaged_state(state_name: str, reason: str) -> ValueError:
    return ValueError(f"the training state {state_name!r} is damaged ({reason}): delete it to continue from the "
                      f"weights alone, or load an earlier save")


def _json_entry(meta: dict, key: str, types: type, required: bool = True, default=None):
    if key not in meta:
        if required:
            raise _Damaged(f"its entry {key!r} is missing")
        return default
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise _Damaged(f"its entry {key!r} is not JSON: {quoted(meta[key], 60)}") from None
    if not isinstance(value, types) or isinstance(value, bool):
        raise _Damaged(f"its entry {key!r} is {quoted(value, 60)}, not {TYPE_NAMES[types]}")
    return value


TYPE_NAMES = {int: "a whole number", dict: "an object"}


def _whole(meta: dict, key: str) -> int:
    value = _json_entry(meta, key, int)
    if value < 0:
        raise _Damaged(f"its {key} is {value}, below 0")
    return value


def _history(meta: dict) -> LossHistory:
    values = _json_entry(meta, "history", dict, required=False, default={})
    columns = []
    for key, kinds, what in (("steps", (int,), "whole numbers"), ("losses", (int, float), "numbers"),
                             ("learning_rates", (int, float), "numbers"), ("val_steps", (int,), "whole numbers"),
                             ("val_losses", (int, float), "numbers")):
        column = values.get(key, [])
        if not isinstance(column, list) or not all(type(v) in kinds for v in column):
            raise _Damaged(f"its loss history's {key} are not all {what}")
        columns.append(tuple(column))
    if len({len(c) for c in columns[:3]}) > 1:
        raise _Damaged("its loss history's steps, losses and learning rates differ in length")
    if len(columns[3]) != len(columns[4]):
        raise _Damaged("its loss history's validation steps and losses differ in length")
    return LossHistory(*columns)


def _optimizer(meta: dict, tensors: dict, parameters: int) -> dict | None:
    """The optimizer state_dict, for an adapter of `parameters` tensors (each is one parameter)."""
    values = _json_entry(meta, "optimizer", dict, required=False)
    if values is None:
        return None
    groups, scalars = values.get("param_groups"), values.get("scalars", {})
    if (not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups)
            or not all(isinstance(g.get("params"), list) and all(type(i) is int for i in g["params"]) for g in groups)):
        raise _Damaged("its optimizer's parameter groups are malformed")
    if not isinstance(scalars, dict):
        raise _Damaged("its optimizer's values are malformed")
    try:
        optimizer = optimizer_from_tensors(tensors, values)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        raise _Damaged("its optimizer state is malformed") from None
    known = [i for g in groups for i in g["params"]]
    if len(known) != parameters:
        raise _Damaged(f"its optimizer state is for {len(known)} parameters, its adapter has {parameters}")
    if not set(optimizer["state"]) <= set(known):
        raise _Damaged("its optimizer state names parameters that no parameter group has")
    return optimizer


def _spec(text: str) -> AdapterSpec:
    try:
        spec = spec_from_json(text)
    except Exception as e:    # JSON, missing or unknown fields, wrong types, ConfigError of a bad value
        raise _Damaged(f"its adapter description is invalid: {quoted(str(e), 80)}") from None
    if not isinstance(spec.kind, str) or spec.kind not in adapters.ADAPTERS or not isinstance(spec.dtype, str) \
            or spec.dtype not in DTYPES:
        raise _Damaged(f"its adapter type {quoted(spec.kind, 40)} or dtype {quoted(spec.dtype, 40)} is unknown")
    return spec


def _load_state(state_path: str) -> tuple[AdapterState, str | None]:
    """The state file's AdapterState and the adapter hash it records; raises _Damaged."""
    try:
        tensors, meta = load_tensors(state_path)
    except SafetensorError as e:
        raise _Damaged(f"it is not a readable safetensors file: {quoted(str(e), 80)}") from None
    if meta.get("format") != STATE_FORMAT:
        raise _Damaged(f"its format is {quoted(meta.get('format'), 60)}, not {STATE_FORMAT!r}")
    if "spec" not in meta:
        raise _Damaged("its entry 'spec' is missing")
    spec = _spec(meta["spec"])
    method = adapters.method(spec.kind)
    step, cursor = _whole(meta, "step"), _whole(meta, "cursor")
    optimizer_name = meta.get("optimizer_name") or None
    history = _history(meta)
    settings = _json_entry(meta, "settings", dict, required=False, default={}) or None
    adapter_hash = meta.get("adapter_sha256")
    if adapter_hash is not None and not re.fullmatch(r"[0-9a-f]{64}", adapter_hash):
        raise _Damaged(f"its adapter hash {quoted(adapter_hash, 80)} is not a sha256")
    run_id = meta.get("run_id")
    if run_id is not None and not RUN_ID.fullmatch(run_id):
        raise _Damaged(f"its run id {quoted(run_id, 80)} is malformed")
    weights = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    try:   # the layers training builds from them: every target's tensors, of the right shapes
        method.build_layers(spec, weights, DTYPES[spec.dtype])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise _Damaged(f"its weights do not fit its adapter: {quoted(str(e), 120)}") from None
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    if ema is not None and ({k: v.shape for k, v in ema.items()} != {k: v.shape for k, v in weights.items()}
                            or not all(v.is_floating_point() for v in ema.values())):
        raise _Damaged("its EMA weights do not fit its adapter")
    optimizer = _optimizer(meta, tensors, len(weights))
    rng = tensors.get("rng")
    if rng is not None and (rng.dtype != torch.uint8 or rng.shape != torch.Generator().get_state().shape):
        raise _Damaged("its random generator state is malformed")
    state = AdapterState(spec, weights, step=step, cursor=cursor, optimizer=optimizer, optimizer_name=optimizer_name,
                         rng=rng, history=history, settings=settings, run_id=run_id, ema=ema)
    return state, adapter_hash


def load_adapter(path: str, patcher=None) -> AdapterState:
    """Resume from a file written by save_adapter: the full state if its .eri-state file is beside it,
    otherwise the weights alone (training continues with a fresh optimizer; logged as a warning). A file of
    another trainer (kohya, LyCORIS, PEFT / diffusers or ComfyUI keys) needs the MODEL (`patcher`) to match
    its layers to. Raises ValueError naming the file for a damaged state, a state saved with another adapter
    file, or NaN/inf weights."""
    name = os.path.basename(path)
    state_path = state_path_for(path)
    state_name = os.path.basename(state_path)
    if os.path.isfile(state_path):
        try:
            state, adapter_hash = _load_state(state_path)
        except _Damaged as e:
            raise _damaged_state(state_name, str(e)) from None
        if adapter_hash is not None and file_sha256(path) != adapter_hash:
            raise ValueError(
                f"the training state {state_name!r} belongs to another save of this adapter (step {state.step}) "
                f"than {name!r}{_saved_step(path)}: a save was interrupted or one of the files was replaced. "
                f"Delete {state_name!r} to continue from the weights of {name!r} alone, or load a save whose pair "
                f"is complete")
        _check_arch(name, state.spec, patcher)
        _check_finite(state_name, state.weights)
        _check_finite(state_name, state.ema or {})
        return state
    try:
        tensors, meta = load_tensors(path)
    except SafetensorError as e:
        raise ValueError(f"{name!r} cannot be read as a safetensors file ({quoted(str(e), 80)}): it is damaged "
                         f"or not an adapter; load an earlier save or another file") from None
    if "eri.spec" in meta:
        try:
            spec = _spec(meta["eri.spec"])
            step = _whole({"step": meta.get("eri.steps", "0")}, "step")
        except _Damaged as e:
            raise ValueError(f"the adapter {name!r} is damaged ({e}): load an earlier save") from None
        method = adapters.method(spec.kind)
        _check_arch(name, spec, patcher)
        try:
            weights = method.from_file_tensors(spec, tensors)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        run_id = meta.get("eri.run_id") or None
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            run_id = None
        logging.warning(
            "EriDiffusion: %r has no training state beside it (%s is missing): training continues from its "
            "weights at step %d with a new optimizer (its moments start from zero), the learning-rate schedule "
            "at step %d, the random generator seeded anew from the training seed, the data order from its "
            "beginning and an empty loss history. Load a save that has its .eri-state to resume exactly",
            name, state_name, step, step)
    elif patcher is None:
        raise ValueError(f"{name!r} was not written by EriDiffusion's Save adapter: connect the MODEL input of "
                         f"Load adapter so its layers can be matched to the model")
    else:
        from .importer import import_adapter
        try:
            spec, weights = import_adapter(path, tensors, patcher)
        except ValueError as e:
            raise ValueError(str(e) if name in str(e) else f"{name}: {e}") from None
        step, run_id = 0, None
    weights = {k: v.to(DTYPES[spec.dtype]) for k, v in weights.items()}
    _check_finite(name, weights)
    return AdapterState(spec, weights, step=step, run_id=run_id)


def _saved_step(path: str) -> str:
    try:
        with safe_open(path, framework="pt") as f:
            step = (f.metadata() or {}).get("eri.steps")
    except Exception:
        return ""
    return f" (step {int(step)})" if step is not None and step.isdigit() else ""


def _check_finite(file_name: str, weights: dict[str, torch.Tensor]) -> None:
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{file_name!r} has NaN/inf weights ({quoted(bad, 100)}): training or sampling it "
                         f"cannot work; load an earlier save")


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


def run_id_of(adapter_path: str) -> str | None:
    """The training run an adapter file was saved by (None: unknown, or not readable)."""
    try:
        with safe_open(adapter_path, framework="pt") as f:
            return (f.metadata() or {}).get("eri.run_id") or None
    except Exception:
        return None


def prefix_for_run(prefix: str, run_id: str, path_of_step, where: str = "", step: int = 0) -> tuple[str, str | None]:
    """The prefix one training run saves under: `prefix` unless saves `<prefix>_<step>` of another run (or of
    an unknown one) exist, then the first of `<prefix>_v2`, `<prefix>_v3`, ... that is free or this run's.
    `path_of_step(prefix, step)` names the files; `where` is put in front of prefixes in the note; `step` is the
    largest step to be saved (for the length of the names). Returns the
    prefix and, when it is not `prefix`, a note saying why (for the log and the node's text)."""
    for version in range(1, MAX_VERSIONS + 1):
        candidate = prefix if version == 1 else f"{prefix}_v{version}"
        saves = saved_steps(lambda n: path_of_step(candidate, n))
        if all(run_id_of(path) == run_id for path in saves.values()):
            if version == 1:
                return prefix, None
            problem = file_name_problem(candidate, step)
            if problem:
                raise ValueError(f"{where}{prefix}_* hold another training run's saves, and the next free name "
                                 f"{candidate!r} {problem}")
            return candidate, (f"{where}{prefix}_* hold another training run's saves: this run saves as "
                               f"{where}{candidate}_*")
    raise ValueError(f"{where}{prefix}_* and {where}{prefix}_v2_* to _v{MAX_VERSIONS}_* all hold other training "
                     f"runs' saves: choose another prefix")


def file_name_problem(prefix: str, step: int = 0) -> str | None:
    """What is wrong with a save prefix as a file name, as a phrase to follow the input's name and value
    ("save_prefix 'x/' ends with a folder separator: ..."), or None. Containment in a folder is checked
    elsewhere (nodes/paths.py)."""
    if not isinstance(prefix, str) or not prefix.strip():
        return "is empty: give a file name such as eri/my_lora"
    control = next((c for c in prefix if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        return f"contains the control character {control!r}: use letters, digits, '-', '_', and '/' between folders"
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        return "contains characters that cannot be in a file name"
    separators = re.escape(os.sep + (os.altsep or ""))
    *folders, last = re.split(f"[{separators}]", prefix)
    if not last.strip():
        return "ends with a folder separator: add a file name after it, as in eri/my_lora"
    for folder in folders:
        size = len(folder.encode("utf-8"))
        if size > NAME_MAX:
            return f"has a folder name of {size} bytes; file systems allow {NAME_MAX}: shorten it"
    size = len(f"{last}_{step:06d}.safetensors".encode("utf-8"))
    if size > NAME_MAX:
        over = size - NAME_MAX
        return (f"makes file names of {size} bytes (<name>_{step:06d}.safetensors), and file systems allow "
                f"{NAME_MAX}: shorten its last part by {over} byte{'s' if over > 1 else ''} or more")
    return None
