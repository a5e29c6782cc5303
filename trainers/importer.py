"""Continuing to train an adapter file that EriDiffusion did not write (kohya, LyCORIS, PEFT / diffusers or
ComfyUI keys): kind, ranks, alphas and layers are read from its tensors and matched to the MODEL.

Layer names are resolved with ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`), the one its LoRA
loaders use, so every key style ComfyUI loads for the architecture is understood; PEFT's attention keys
(`...attn1.to_q.lora_A.weight`, without diffusers' old `.processor`) are added to it. The weights are
returned under this pack's kohya keys, so the adapter then saves, trains and resumes like one made here.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import torch

from . import adapters
from .adapters.base import DORA_SUFFIX, file_key, target_shape
from .comfy_compat import is_linear
from .config import AdapterSpec, quoted

# suffix in a file -> (adapter kind, suffix in our files); kind None: belongs to any kind
SUFFIXES = {
    "lora_up.weight": ("lora", "lora_up.weight"), "lora_down.weight": ("lora", "lora_down.weight"),
    "lora_B.weight": ("lora", "lora_up.weight"), "lora_A.weight": ("lora", "lora_down.weight"),
    "lora_B.default.weight": ("lora", "lora_up.weight"), "lora_A.default.weight": ("lora", "lora_down.weight"),
    "lora.up.weight": ("lora", "lora_up.weight"), "lora.down.weight": ("lora", "lora_down.weight"),
    "lora_linear_layer.up.weight": ("lora", "lora_up.weight"),
    "lora_linear_layer.down.weight": ("lora", "lora_down.weight"),
    **{s: ("lokr", s) for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    **{s: ("loha", s) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "alpha": (None, "alpha"), DORA_SUFFIX: (None, DORA_SUFFIX),
}
UNSUPPORTED = {
    "lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)", "lokr_t2": "LoKr with Tucker decomposition "
    "(lokr_t2)", "hada_t1": "LoHa with Tucker decomposition (hada_t1)", "hada_t2": "LoHa with Tucker "
    "decomposition (hada_t2)", "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "a2.weight": "GLoRA",
    "diff": "a full weight difference (.diff)", "diff_b": "a bias difference (.diff_b)", "w_norm": "norm "
    "weights (.w_norm)", "b_norm": "norm weights (.b_norm)", "set_weight": "replaced weights (.set_weight)",
    "reshape_weight": "reshaped weights", "lora_magnitude_vector": "PEFT's DoRA (lora_magnitude_vector, which "
    "ComfyUI's loader does not read either)",
}
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_prior_te")
KIND_NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}


def _split(key: str) -> tuple[str, str] | None:
    """(stem, suffix) of a file key, by the longest known suffix."""
    best = None
    for suffix in (*SUFFIXES, *UNSUPPORTED):
        if key.endswith("." + suffix) and (best is None or len(suffix) > len(best)):
            best = suffix
    return (key[: -len(best) - 1], best) if best else None


def _guess_arch(stems) -> str | None:
    text = " ".join(stems)
    for marker, name in (("double_blocks", "Flux"), ("single_transformer_blocks", "Flux"),
                         ("joint_blocks", "SD3"), ("input_blocks", "SDXL or SD1.x"),
                         ("down_blocks", "SDXL or SD1.x")):
        if marker in text:
            return name
    return None


def key_map(patcher) -> dict:
    """File stem -> `diffusion_model.<path>.weight` (or a (key, slice) tuple for fused layers)."""
    import comfy.lora
    # outside inference mode (nodes run in it): ComfyUI reads the keys from model.state_dict(), which detaches
    # every weight, and torch cannot detach a QuantizedTensor weight in inference mode (0.3.75)
    with torch.inference_mode(False):
        mapping = dict(comfy.lora.model_lora_keys_unet(patcher.model, {}))
    for stem, target in list(mapping.items()):
        if ".processor." in stem:   # PEFT's names for diffusers attention: no .processor, to_out.0
            plain = stem.replace(".processor.", ".")
            mapping.setdefault(plain, target)
            if plain.endswith(".to_out"):
                mapping.setdefault(plain + ".0", target)
    return mapping


def _lookup(mapping: dict, stem: str):
    for candidate in (stem, "unet." + stem[len("base_model.model."):] if stem.startswith("base_model.model.")
                      else None, "diffusion_model." + stem):
        if candidate is not None and candidate in mapping:
            return mapping[candidate]
    return None


def _most_common(values) -> int:
    return Counter(values).most_common(1)[0][0] if values else 0


def _common(values, what: str, name: str) -> float:
    values = list(values)
    if not values:
        return 0
    counts = Counter(values)
    if len(counts) > 1:
        raise ValueError(f"{name}: its layers have different {what} ({', '.join(f'{v:g}' for v in sorted(counts))}); "
                         f"EriDiffusion keeps one for linear and one for convolution layers, so this file cannot "
                         f"be trained further as it is")
    return values[0]


def import_adapter(path: str, tensors: dict[str, torch.Tensor], patcher) -> tuple[AdapterSpec, dict]:
    """(spec, weights) for an adapter file of another trainer, matched to `patcher`'s model."""
    from .arch import detect
    from .checkpoint import target_of
    name = os.path.basename(path)
    arch = detect(patcher)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            raise ValueError(f"{name}: key {quoted(key)} is not a LoRA, DoRA, LoKr or LoHa weight EriDiffusion can "
                             f"train; choose a LoRA / LyCORIS (LoKr, LoHa) file")
        stem, suffix = split
        if suffix in UNSUPPORTED:
            raise ValueError(f"{name} holds {UNSUPPORTED[suffix]} ({quoted(key)}), which EriDiffusion cannot continue "
                             f"training; choose a LoRA, DoRA, LoKr or LoHa file, or start a new adapter with "
                             f"Create adapter")
        groups.setdefault(stem, {})[suffix] = tensor
    skipped = [s for s in groups if s.startswith(TEXT_ENCODER_PREFIXES)]
    if skipped:
        logging.warning("EriDiffusion: %s: %d text-encoder layers skipped (of another trainer's file, Load adapter "
                        "continues the diffusion model's layers only); they are not in the files saved from this "
                        "adapter", name, len(skipped))
    stems = [s for s in groups if s not in skipped]
    if not stems:
        raise ValueError(f"{name} has no diffusion-model layers (text encoder only?); choose a LoRA for the MODEL")
    mapping = key_map(patcher)
    missing = [s for s in stems if _lookup(mapping, s) is None]
    if missing:
        guess = _guess_arch(missing)
        made_for = f"it looks made for {guess}" if guess else "it was made for another model"
        raise ValueError(f"{name}: {len(missing)} of {len(stems)} layers match no layer of this {arch.name} MODEL "
                         f"(first: {quoted(missing[0])}); {made_for}. Connect a MODEL of that architecture to Load "
                         f"adapter, or choose a file made for {arch.name}")
    kinds = {SUFFIXES[s][0] for g in (groups[s] for s in stems) for s in g} - {None}
    if len(kinds) != 1:
        found = ", ".join(KIND_NAMES[k] for k in sorted(kinds)) or "no adapter weights"
        raise ValueError(f"{name} holds {found}; EriDiffusion trains one adapter type at a time (LoRA, LoKr or "
                         f"LoHa, each with or without DoRA)")
    kind = kinds.pop()
    root = patcher.model.diffusion_model
    targets, canonical, ranks, alphas = [], {}, {False: [], True: []}, {False: [], True: []}
    dora = [DORA_SUFFIX in groups[s] for s in stems]
    if any(dora) and not all(dora):
        raise ValueError(f"{name}: only some layers have dora_scale; EriDiffusion trains DoRA on all layers or none")
    for stem in stems:
        weight_key = _lookup(mapping, stem)
        if not isinstance(weight_key, str):
            raise ValueError(f"{name}: layer {quoted(stem)} is a slice of a fused layer ({weight_key[0]}), which "
                             f"EriDiffusion does not train; choose a file with whole layers")
        module_path = weight_key[len("diffusion_model."):-len(".weight")]
        module = root.get_submodule(module_path)
        if not (is_linear(module) or isinstance(module, torch.nn.Conv2d)):
            raise ValueError(f"{name}: layer {quoted(stem)} is a {type(module).__name__}; EriDiffusion adapts linear "
                             f"and convolution layers only")
        target = target_of(module_path, module)
        targets.append(target)
        own = groups[stem]
        rank = _rank(kind, own)
        is_conv = len(target) == 5
        if rank is not None:
            ranks[is_conv].append(rank)
            alphas[is_conv].append(float(own["alpha"].item()) if "alpha" in own else float(rank))
        if DORA_SUFFIX in own:
            scale = own[DORA_SUFFIX]
            if scale.shape[0] != 1 and target_shape(target)[0] != 1:
                raise ValueError(f"{name}: dora_scale of layer {quoted(stem)} has shape {tuple(scale.shape)}, one "
                                 f"magnitude per output channel (LyCORIS wd_on_out). ComfyUI applies that form "
                                 f"with the norm of the base weight only, so it cannot be trained to match what "
                                 f"ComfyUI shows; choose a DoRA file with one magnitude per input channel "
                                 f"(shape (1, in)), or a file without DoRA")
        for suffix, tensor in own.items():
            if suffix != "alpha":
                canonical[f"{file_key(module_path)}.{SUFFIXES[suffix][1]}"] = tensor
    linear_rank = _most_common(ranks[False]) or _most_common(ranks[True]) or 1
    conv_rank = _most_common(ranks[True])
    linear_alpha = _common(alphas[False], "alphas", name) or _common(alphas[True], "alphas", name)
    if not linear_alpha:   # a LoKr of full matrices: alpha is unused; keep the file's
        linear_alpha = next((float(groups[s]["alpha"].item()) for s in stems if "alpha" in groups[s]), 1.0)
    conv_alpha = _common(alphas[True], "alphas", name)
    linear_paths = {t[0] for t in targets if len(t) == 3}
    preset = next((p for p in arch.presets
                   if {q for q, _ in arch.target_modules(root, p)} == linear_paths), "custom")
    spec = AdapterSpec(arch=arch.name, kind=kind, rank=linear_rank, alpha=float(linear_alpha), preset=preset,
                       seed=0, dtype="fp32", targets=tuple(targets), dora=all(dora),
                       lokr_full_w2=kind == "lokr" and not ranks[False] + ranks[True],
                       conv=any(len(t) == 5 for t in targets),
                       conv_rank=conv_rank if conv_rank != linear_rank else 0,
                       conv_alpha=float(conv_alpha) if conv_alpha != linear_alpha else 0.0)
    weights = adapters.method(kind).from_file_tensors(spec, canonical)
    return spec, weights


def _rank(kind: str, own: dict) -> int | None:
    """The rank alpha divides by in ComfyUI's loader (None: alpha is not used, a LoKr of full matrices)."""
    wanted = {"lora": ("lora_down.weight",), "loha": ("hada_w1_b",), "lokr": ("lokr_w2_b", "lokr_w1_b")}[kind]
    for suffix in wanted:
        for key, tensor in own.items():
            if SUFFIXES[key][1] == suffix:
                return int(tensor.shape[0])
    return None
