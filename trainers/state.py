"""ERI_ADAPTER: an adapter and everything needed to continue training it exactly.

A value of this type leaves a node and is never changed again (ComfyUI caches node outputs and hands the
same object to later prompts): training takes one state and returns a new one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

import torch

from . import adapters, text_encoder
from .adapters.base import DeviceCached, base_weight, install
from .config import AdapterSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LossHistory:
    steps: tuple[int, ...] = ()
    losses: tuple[float, ...] = ()
    learning_rates: tuple[float, ...] = ()
    # the held-out set's loss, on the steps it was evaluated (Train steps' validation inputs)
    val_steps: tuple[int, ...] = ()
    val_losses: tuple[float, ...] = ()

    def __repr__(self):
        last = f", last loss {self.losses[-1]:.5f} at step {self.steps[-1]}" if self.steps else ""
        val = f", validation loss {self.val_losses[-1]:.5f} at step {self.val_steps[-1]}" if self.val_steps else ""
        return f"LossHistory({len(self.steps)} steps{last}{val})"

    def extended(self, steps, losses, lrs, val_steps=(), val_losses=()) -> "LossHistory":
        return LossHistory(self.steps + tuple(steps), self.losses + tuple(losses), self.learning_rates + tuple(lrs),
                           self.val_steps + tuple(val_steps), self.val_losses + tuple(val_losses))

    def thinned(self, limit: int) -> "LossHistory":
        """At most `limit` points (and `limit` validation points): the newest half exactly, the older steps at the
        smallest power-of-two stride of step numbers that fits. Thinning a thinned history again (each save of a
        long run does) keeps the same points: only steps that are multiples of the stride remain, and strides
        only grow."""
        keep, val_keep = _kept(self.steps, limit), _kept(self.val_steps, limit)
        if keep is None and val_keep is None:
            return self
        keep = range(len(self.steps)) if keep is None else keep
        val_keep = range(len(self.val_steps)) if val_keep is None else val_keep
        return LossHistory(tuple(self.steps[i] for i in keep), tuple(self.losses[i] for i in keep),
                           tuple(self.learning_rates[i] for i in keep), tuple(self.val_steps[i] for i in val_keep),
                           tuple(self.val_losses[i] for i in val_keep))


def _kept(steps: tuple[int, ...], limit: int) -> list[int] | None:
    """The indices LossHistory.thinned keeps of `steps`; None: all of them."""
    count = len(steps)
    if count <= limit:
        return None
    recent = limit // 2
    old = count - recent
    budget = limit - recent
    span = max(steps[:old]) - min(steps[:old])
    stride = 2
    while span // stride + 1 > budget:     # a bound of the multiples of `stride` among distinct steps
        stride *= 2
    while True:                            # (one pass, unless steps repeat)
        keep = [i for i in range(old) if steps[i] % stride == 0]
        if len(keep) <= budget:
            break
        stride *= 2
    return keep + list(range(old, count))


@dataclass(frozen=True)
class AdapterState:
    spec: AdapterSpec
    weights: dict[str, torch.Tensor]            # CPU tensors in the spec's dtype, keyed by parameter name
    step: int = 0                               # optimizer steps taken
    cursor: int = 0                             # micro-batches consumed (position in the data order)
    optimizer: dict | None = None               # torch optimizer state_dict, CPU tensors
    optimizer_name: str | None = None
    rng: torch.Tensor | None = None             # state of the generator for noise, timesteps and dropout
    history: LossHistory = field(default_factory=LossHistory)
    settings: dict | None = None                # TrainingSettings of the last run, as a dict
    # One training run (from a new adapter, through chained Train steps, saves and resumes of them) has one id;
    # save series of another run are never overwritten (checkpoint.prefix_for_run). None: not trained or
    # saved yet, or loaded from a file without one.
    run_id: str | None = None
    # Exponential moving average of `weights` (fp32 CPU tensors, the same keys) while training keeps one
    # (TrainingSettings.ema); then it is the adapter that is saved, sampled and applied.
    ema: dict[str, torch.Tensor] | None = None

    @property
    def applied_weights(self) -> dict[str, torch.Tensor]:
        """The weights the adapter stands for: its EMA when training keeps one, else its weights."""
        return self.ema if self.ema is not None else self.weights

    def __repr__(self):
        return (f"AdapterState({self.spec.kind} r{self.spec.rank} α{self.spec.alpha:g} on {self.spec.arch}, "
                f"{len(self.spec.targets)} layers, step {self.step}{', EMA' if self.ema is not None else ''}"
                f"{'' if self.spec.text_encoder == 'none' else ', text encoder ' + self.spec.text_encoder})")

    def replace(self, **changes) -> "AdapterState":
        return dataclasses.replace(self, **changes)


def new_adapter(spec: AdapterSpec, patcher=None, clip=None) -> AdapterState:
    """A new adapter for `spec`; DoRA magnitudes start from the weights of `patcher`'s model (and of `clip`'s
    text encoders, for text-encoder targets)."""
    method = adapters.method(spec.kind)
    base_weights = None
    if patcher is not None:
        root = patcher.model.diffusion_model
        clip_weights = text_encoder.base_weights(clip) if clip is not None else None
        base_weights = lambda path: (clip_weights(path) if text_encoder.is_text_encoder(path)  # noqa: E731
                                     else base_weight(root.get_submodule(path), "cpu"))
    layers = method.build_layers(spec, None, DTYPES[spec.dtype], base_weights=base_weights)
    return AdapterState(spec, method.layer_weights(layers))


def build_layers(state: AdapterState, device=None, trainable: bool = False, weights=None) -> dict:
    """The adapter's layers with `weights` (default: the state's own weights)."""
    method = adapters.method(state.spec.kind)
    layers = method.build_layers(state.spec, state.weights if weights is None else weights,
                                 DTYPES[state.spec.dtype], device)
    for layer in layers.values():
        layer.requires_grad_(trainable)
    return layers


def patched_model(patcher, state: AdapterState):
    """A clone of `patcher` that applies the adapter (its EMA, when it has one) while loaded, for ComfyUI's
    samplers."""
    with torch.inference_mode(False):
        layers = {path: DeviceCached(layer) for path, layer in
                  build_layers(state, weights=state.applied_weights).items() if not text_encoder.is_text_encoder(path)}
    clone = patcher.clone()
    install(clone, layers)
    return clone


def has_text_encoder(state: AdapterState) -> bool:
    return any(text_encoder.is_text_encoder(target[0]) for target in state.spec.targets)


def patched_clip(clip, state: AdapterState):
    """A clone of `clip` that applies the adapter's text-encoder layers (its EMA, when it has one) while loaded;
    `clip` itself when the adapter has none."""
    if not has_text_encoder(state):
        return clip
    with torch.inference_mode(False):
        layers = {path: DeviceCached(layer) for path, layer in
                  build_layers(state, weights=state.applied_weights).items() if text_encoder.is_text_encoder(path)}
    return text_encoder.patched_clip(clip, layers)


# -------------------------------------------------------------------------------- optimizer state <-> tensors
def optimizer_to_tensors(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimizer state_dict into safetensors-storable tensors and a JSON-able remainder.
    Nested dicts (bitsandbytes keeps its quantisation state in one) are flattened with '/' paths."""
    tensors, scalars = {}, {}

    def walk(prefix: str, value):
        if isinstance(value, torch.Tensor):
            tensors["optimizer/" + prefix] = value
        elif isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}/{key}", sub)
        else:
            scalars[prefix] = value

    for index, values in optimizer_state["state"].items():
        walk(str(index), values)
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}

    def put(path: str, value):
        index, *names = path.split("/")
        node = state.setdefault(int(index), {})
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value

    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            put(key[len("optimizer/"):], value)
    for key, value in meta.get("scalars", {}).items():
        put(key, value)
    return {"state": state, "param_groups": meta["param_groups"]}


def cpu_copy(tree):
    """Deep copy with every tensor detached onto the CPU (what an AdapterState may hold)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(v) for v in tree)
    return copy.deepcopy(tree)


def spec_to_json(spec: AdapterSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


def spec_from_json(text: str) -> AdapterSpec:
    values = json.loads(text)
    values["targets"] = tuple(tuple(t) for t in values["targets"])
    return AdapterSpec(**values)
