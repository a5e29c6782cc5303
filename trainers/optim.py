"""Optimizers and learning-rate schedules by name."""
from __future__ import annotations

import functools

import torch

from . import fused
from .config import ConfigError, TrainingSettings


def _adamw(params, s: TrainingSettings, device):
    # Fused (one kernel family for every parameter, on CUDA and the CPU alike): it can also skip a step on the
    # device (see skips_on_device), so the training loop need not wait for the GPU before stepping.
    try:
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay, fused=True)
    except (RuntimeError, ValueError):     # a torch or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay, foreach=True)


def _package(module: str, optimizer: str, pip_name: str):
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as e:   # ImportError, or a CUDA library that fails to load
        raise ConfigError(f"optimizer {optimizer} needs {pip_name}, which could not be loaded ({e}). Install it "
                          f"with 'pip install {pip_name}' or choose optimizer adamw") from e


# bitsandbytes' optimizers (AdamW8bit, Lion, Lion8bit) step on CPU tensors too (its CPU backend), so they train
# and are tested without a GPU.
def _adamw8bit(params, s: TrainingSettings, device, flat: bool = True):
    bnb = _package("bitsandbytes", "adamw8bit", "bitsandbytes")
    if flat:
        return _flat_adamw8bit_class(bnb)(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    return bnb.optim.AdamW8bit(params, lr=s.learning_rate, weight_decay=s.weight_decay)


_BNB_BLOCK = 256       # elements per absmax of bitsandbytes' blockwise 8-bit state (its optim/optimizer.py)


@functools.cache
def _flat_adamw8bit_class(bnb):
    class FlatAdamW8bit(bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit, stepping each parameter group's tensors as one flat tensor per dtype and
        device. bitsandbytes steps tensor by tensor, each a Python call, a kernel and a `torch.cuda.synchronize()`:
        measured on an H200, SDXL's LoRA (1,400 tensors) stepped in 0.12 s, more than the rest of the step
        (AdamW8bit 0.222 s/step against fused AdamW's 0.099). The parameters (and their .grad) become views of
        the flat tensor (and of a flat gradient). Each starts on a 256-element block boundary, zero-padded to the
        next, so every block of 8-bit state, which has its own absmax, holds one tensor's elements as it does
        tensor by tensor; tensors under bitsandbytes' 8-bit minimum (4,096 elements) go in a flat tensor with
        32-bit state, as each would have. The state loads and saves in the tensor-by-tensor layout, so states
        saved by either resume in the other."""

        def __init__(self, params, **kwargs):
            groups = list(params)
            if not groups or not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            self.members = []        # per group: (param, flat tensor or None, offset) in the caller's order
            self.bits32 = set()      # ids of the flat tensors that keep 32-bit state
            flat_groups = []
            minimum = kwargs.get("min_8bit_size", 4096)
            for group in groups:
                params = list(group["params"])
                layout, members = {}, []
                for p in params:
                    key = (p.dtype, p.device, p.numel() >= minimum)
                    at = layout.setdefault(key, [])
                    offset = sum(_padded(q.numel()) for q in at)
                    at.append(p)
                    members.append([p, key, offset])
                flats = {}
                for key, tensors in layout.items():
                    flat = torch.zeros(sum(_padded(q.numel()) for q in tensors), dtype=key[0], device=key[1])
                    flat.grad = torch.zeros_like(flat)
                    flats[key] = flat
                    if not key[2]:
                        self.bits32.add(id(flat))
                for member in members:
                    p, key, offset = member
                    flat, n = flats[key], p.numel()
                    with torch.no_grad():
                        flat[offset:offset + n].copy_(p.detach().reshape(-1))
                    p.data = flat[offset:offset + n].view_as(p)
                    p.grad = flat.grad[offset:offset + n].view_as(p)
                    member[1] = flat
                self.members.append(members)
                settings = {k: v for k, v in group.items() if k != "params"}
                flat_groups.append({**settings, "params": list(flats.values())})
            super().__init__(flat_groups, **kwargs)
            self.counted_conditionally = []    # the states whose step count the last found_inf step raised

        skips_steps_on_device = True     # step() with `found_inf` set (step_skipping_on_device)

        @torch.no_grad()
        def step(self, closure=None):
            """bitsandbytes' step without the torch.cuda.synchronize() it makes after every tensor, which only its
            paged optimizers need: the host goes on to queue the next step's work while the GPU steps. With
            `self.found_inf` (a device flag) set, the step is skipped on the device where it is nonzero, as torch's
            fused AdamW skips it (bitsandbytes' kernels take no such flag: the weights and state are kept and put
            back, copied on the GPU only where the flag is set: fused.copy_if_flagged); the host's step count goes
            back in uncount_skipped_step once the host knows."""
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            found_inf = getattr(self, "found_inf", None)
            self.counted_conditionally = []
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if len(state) == 0:
                        self.init_state(group, p, gindex, pindex)
                    kept = []
                    if found_inf is not None:
                        kept = [(t, self._kept_if_flagged(found_inf, t))
                                for t in (p, *(state[k] for k in _STEPPED if k in state))]
                        self.counted_conditionally.append(state)
                    self.update_step(group, p, gindex, pindex)
                    for tensor, before in kept:
                        fused.copy_if_flagged(found_inf, before, tensor, interpret=self.interpret_kernels)
            return loss

        interpret_kernels = False     # the tests' CPU runs of the flag copy's Triton kernel, interpreted

        def _kept_if_flagged(self, found_inf: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
            """A copy of `tensor` to put back if found_inf is set: on the GPU made only where it is (the step
            that trains copies nothing), elsewhere always, for the torch.where that puts it back."""
            if fused.flag_copy_takes(tensor, self.interpret_kernels):
                kept = torch.empty_like(tensor)
                fused.copy_if_flagged(found_inf, tensor, kept, interpret=self.interpret_kernels)
                return kept
            return tensor.clone()

        def uncount_skipped_step(self) -> None:
            """The host's step counts after a step that found_inf skipped on the device."""
            for state in self.counted_conditionally:
                state["step"] -= 1
            self.counted_conditionally = []

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            if id(group["params"][pindex]) in self.bits32:
                config["optim_bits"] = 32
            return config

        def state_dict(self):
            """The state as bitsandbytes' AdamW8bit keeps it for these parameters, one entry per tensor."""
            flat_state = super().state_dict()
            wrapped = self._FSDP_WRAPPED_QUANT_STATE_KEY
            index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            state, groups, at = {}, [], 0
            for saved_group, members in zip(flat_state["param_groups"], self.members):
                for p, flat, offset in members:
                    entry = flat_state["state"].get(index[id(flat)])
                    if entry is not None:
                        entry = dict(entry)
                        if wrapped in entry:
                            entry[wrapped] = _slice_state(entry[wrapped], offset, p.shape, flat.numel())
                        state[at] = _slice_state(entry, offset, p.shape, flat.numel())
                    at += 1
                groups.append({**saved_group, "params": list(range(at - len(members), at))})
            return {"state": state, "param_groups": groups}

        def load_state_dict(self, state_dict, move_to_device=True):
            """Loads a state in the one-entry-per-tensor layout (state_dict's, and bitsandbytes' own)."""
            wrapped = self._FSDP_WRAPPED_QUANT_STATE_KEY
            saved = state_dict["param_groups"]
            if len(saved) != len(self.members) or any(len(g["params"]) != len(m) for g, m in zip(saved, self.members)):
                raise ValueError("loaded state dict has other parameter groups than this optimizer")
            flat_state, groups, at = {}, [], 0
            for saved_group, members, group in zip(saved, self.members, self.param_groups):
                entries = {}
                for (p, flat, offset), i in zip(members, saved_group["params"]):
                    entry = state_dict["state"].get(i)
                    if entry is not None:
                        entry = {**entry, **entry.get(wrapped, {})}
                        entry.pop(wrapped, None)
                        entries.setdefault(id(flat), []).append((p, offset, entry))
                for flat in group["params"]:
                    parts = entries.get(id(flat), [])
                    count = sum(1 for _, f, _ in members if f is flat)
                    if parts and len(parts) == count:
                        flat_state[at] = _joined_state(parts, flat)
                    at += 1
                groups.append({**saved_group, "params": list(range(at - len(group["params"]), at))})
            super().load_state_dict({"state": flat_state, "param_groups": groups}, move_to_device=move_to_device)

    return FlatAdamW8bit


_PER_ELEMENT = ("state1", "state2")     # bitsandbytes' state keys with one value per parameter element
_STEPPED = ("state1", "state2", "absmax1", "absmax2")     # the state tensors its step writes


def _padded(n: int) -> int:
    return -(-n // _BNB_BLOCK) * _BNB_BLOCK


def _slice_state(entry: dict, offset: int, shape: torch.Size, flat_numel: int) -> dict:
    """One tensor's share of a flat tensor's state, as bitsandbytes keeps it: per-element tensors in the
    parameter's shape, per-block absmax sliced by block."""
    sliced, n = {}, shape.numel()
    for key, value in entry.items():
        if key in _PER_ELEMENT and isinstance(value, torch.Tensor) and value.numel() == flat_numel:
            value = value[offset:offset + n].reshape(shape).clone()
        elif isinstance(value, torch.Tensor) and key.startswith("absmax"):
            value = value[offset // _BNB_BLOCK:offset // _BNB_BLOCK + -(-n // _BNB_BLOCK)].clone()
        sliced[key] = value
    return sliced


def _joined_state(parts: list, flat: torch.Tensor) -> dict:
    """A flat tensor's state from its tensors' (each at its offset). 8-bit padding holds the code of 0 in its
    map (bitsandbytes' signed map has 0 at 127): it dequantizes to 0, as the padding's own steps keep it."""
    first = parts[0][2]
    joined = {}
    for key, value in first.items():
        if key in _PER_ELEMENT and isinstance(value, torch.Tensor):
            qmap = first.get("qmap" + key[-1]) if value.dtype == torch.uint8 else None
            fill = int((qmap == 0).nonzero()[0]) if qmap is not None else 0
            out = torch.full((flat.numel(),), fill, dtype=value.dtype)
            for p, offset, entry in parts:
                out[offset:offset + p.numel()] = entry[key].reshape(-1).to("cpu")
            value = out
        elif isinstance(value, torch.Tensor) and key.startswith("absmax"):
            out = torch.zeros(flat.numel() // _BNB_BLOCK, dtype=value.dtype)
            for p, offset, entry in parts:
                blocks = -(-p.numel() // _BNB_BLOCK)
                out[offset // _BNB_BLOCK:offset // _BNB_BLOCK + blocks] = entry[key].to("cpu")
            value = out
        joined[key] = value
    return joined


def _lion(params, s: TrainingSettings, device):
    bnb = _package("bitsandbytes", "lion", "bitsandbytes")
    return bnb.optim.Lion(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def _lion8bit(params, s: TrainingSettings, device):
    bnb = _package("bitsandbytes", "lion8bit", "bitsandbytes")
    return bnb.optim.Lion8bit(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def _adafactor(params, s: TrainingSettings, device):
    # A fixed learning rate, as kohya and ai-toolkit run it: Adafactor's relative step size (torch's only mode)
    # scales each update by the parameter's RMS, which keeps a zero-initialised lora_up at zero.
    from transformers.optimization import Adafactor
    return Adafactor(params, lr=s.learning_rate, weight_decay=s.weight_decay, relative_step=False,
                     scale_parameter=False, warmup_init=False)


def _prodigy(params, s: TrainingSettings, device):
    prodigyopt = _package("prodigyopt", "prodigy", "prodigyopt")
    return prodigyopt.Prodigy(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def _adamw_schedulefree(params, s: TrainingSettings, device):
    schedulefree = _package("schedulefree", "adamw_schedulefree", "schedulefree")
    return schedulefree.AdamWScheduleFree(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def _came(params, s: TrainingSettings, device):
    # pytorch-optimizer's CAME: the paper's own package (came-pytorch) has had one release, in 2023.
    pytorch_optimizer = _package("pytorch_optimizer", "came", "pytorch-optimizer")
    return pytorch_optimizer.CAME(params, lr=s.learning_rate, weight_decay=s.weight_decay)


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw8bit, "adafactor": _adafactor, "prodigy": _prodigy,
              "lion": _lion, "lion8bit": _lion8bit, "adamw_schedulefree": _adamw_schedulefree, "came": _came}


# State keys of torch's Adafactor, which `adafactor` was before transformers' took its place: such a state cannot
# continue transformers' Adafactor (other keys, another update).
_FOREIGN_STATE_KEYS = {"adafactor": {"row_var", "col_var", "variance"}}


def state_fits(name: str, optimizer_state: dict) -> bool:
    """Whether a saved state of optimizer `name` can be loaded into ours of that name."""
    foreign = _FOREIGN_STATE_KEYS.get(name, set())
    return not any(foreign & set(values) for values in optimizer_state["state"].values())


def make_optimizer(params, settings: TrainingSettings, device: torch.device,
                   owns_storage: bool = True) -> torch.optim.Optimizer:
    """`owns_storage`: the optimizer may make the parameters views of its own buffers (AdamW8bit's flat
    tensors); not for parameters that are already views of another's (OffloadedOptimizer's masters)."""
    if settings.optimizer == "adamw8bit":
        return _adamw8bit(list(params), settings, device, flat=owns_storage)
    return OPTIMIZERS[settings.optimizer](list(params), settings, device)


def is_schedule_free(optimizer) -> bool:
    """Whether the optimizer (or the one OffloadedOptimizer steps on the CPU) moves the weights between the point
    it computes gradients at and the one it evaluates with (to_training_point, to_evaluation_point)."""
    return callable(getattr(getattr(optimizer, "inner", optimizer), "train", None))


def to_training_point(optimizer) -> None:
    """Schedule-free optimizers compute gradients at another point than the weights they evaluate with: move the
    parameters there before a step's forward passes (other optimizers: nothing)."""
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()


def to_evaluation_point(optimizer) -> None:
    """Back to the weights a schedule-free optimizer evaluates with (its average), after each step: what is
    saved, sampled and resumed from. Every step makes the same round trip, so a resumed run continues exactly."""
    if callable(getattr(optimizer, "eval", None)):
        optimizer.eval()


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` can take a device tensor `found_inf` and skip the update when it is nonzero
    (torch's fused Adam/AdamW, which GradScaler drives the same way; the flat AdamW8bit): a NaN step is then
    skipped without the host reading the loss first."""
    return getattr(optimizer, "skips_steps_on_device", False) or (
        getattr(optimizer, "_step_supports_amp_scaling", False)
        and all(group.get("fused") for group in optimizer.param_groups))


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a state_dict but keep this optimizer's implementation (fused / foreach): a state saved by another
    torch build or device would otherwise bring its own choice along with its hyperparameters."""
    kept = [{k: group.get(k) for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, implementation in zip(optimizer.param_groups, kept):
        group.update(implementation)


def step_skipping_on_device(optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device where found_inf (a float tensor on the parameters' device) is
    nonzero; torch's fused kernels then also leave their step counters as they were."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def step_skipped_on_device(optimizer) -> None:
    """After a step_skipping_on_device step whose flag the host has now read as set: the optimizer's count of
    steps kept on the host goes back (the flat AdamW8bit's; torch's fused kernels did not count the step)."""
    uncount = getattr(optimizer, "uncount_skipped_step", None)
    if uncount is not None:
        uncount()


class OffloadedOptimizer:
    """Steps fp32 copies of the parameters in CPU memory, where the optimizer state also lives: gradients
    are copied down after backward and the new weights copied back. Saves the GPU only the optimizer state (and
    fp32 master weights of bf16 adapters), 8-12 bytes per adapter parameter, for a copy each way and a step on the
    CPU per optimizer step, which nothing overlaps (the next forward needs the new weights).

    The master weights are views of one flat buffer (pinned when the parameters are on a GPU), and the gradients
    come down into another: one copy each way per step, not one (synchronous) copy per parameter."""

    def __init__(self, params, make):
        self.params = list(params)
        pinned = any(p.device.type == "cuda" for p in self.params)
        total = sum(p.numel() for p in self.params)
        self.flat_masters = torch.empty(total, dtype=torch.float32, pin_memory=pinned)
        self.flat_grads = torch.empty(total, dtype=torch.float32, pin_memory=pinned)
        self.masters, self.grad_views, at = [], [], 0
        for p in self.params:
            master = self.flat_masters[at:at + p.numel()].view(p.shape)
            master.copy_(p.detach())
            self.masters.append(master.requires_grad_(True))
            self.grad_views.append(self.flat_grads[at:at + p.numel()].view(p.shape))
            at += p.numel()
        self.inner = make(self.masters)

    @torch.no_grad()
    def step(self):
        with_grads = [i for i, p in enumerate(self.params) if p.grad is not None]
        if with_grads:
            device = self.params[with_grads[0]].device
            flat = torch.cat([self.params[i].grad.detach().reshape(-1).float() for i in with_grads])
            if len(with_grads) == len(self.params):
                self.flat_grads.copy_(flat, non_blocking=True)
            else:
                flat = flat.cpu()
                at = 0
                for i in with_grads:
                    self.grad_views[i].view(-1).copy_(flat[at:at + self.params[i].numel()])
                    at += self.params[i].numel()
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        for i, master in enumerate(self.masters):
            master.grad = self.grad_views[i] if self.params[i].grad is not None else None
        self.inner.step()
        self._copy_up()

    def _copy_up(self):
        """The master weights to the parameters: one copy to the device, then split there."""
        device = self.params[0].device if self.params else None
        if device is None:
            return
        flat = self.flat_masters.to(device, non_blocking=True)
        at = 0
        for param in self.params:
            param.copy_(flat[at:at + param.numel()].view(param.shape))
            at += param.numel()

    def zero_grad(self, set_to_none: bool = True):
        for param in self.params:
            param.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def train(self):
        self._switch(to_training_point)

    @torch.no_grad()
    def eval(self):
        self._switch(to_evaluation_point)

    def _switch(self, mode):
        if is_schedule_free(self.inner):   # the weights on the device follow
            mode(self.inner)
            self._copy_up()

    @property
    def param_groups(self):
        return self.inner.param_groups

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@functools.lru_cache(maxsize=32)
def _transformers_schedule(name: str, steps: int, cycles: int, power: float):
    """transformers' multiplier function of (step after warm-up) for a schedule over `steps` steps."""
    from transformers.optimization import get_scheduler
    with torch.inference_mode(False):   # a stand-in optimizer: only its learning rate of 1 is read
        holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    kwargs = {"cosine_with_restarts": {"num_cycles": cycles}, "polynomial": {"lr_end": 0.0, "power": power}}
    return get_scheduler(name, holder, num_warmup_steps=0, num_training_steps=steps,
                         scheduler_specific_kwargs=kwargs.get(name)).lr_lambdas[0]


def learning_rate(settings: TrainingSettings, step: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up, then the schedule over the remaining steps. A pure
    function of the step, so a resumed run needs no scheduler state. Warm-up is ours: transformers' spends its
    first step at a learning rate of 0."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    decay_steps = max(1, total_steps - settings.warmup_steps)
    after = min(step - settings.warmup_steps, decay_steps)     # past the schedule's end it stays at its end
    if settings.schedule == "step":   # torch's StepLR (ai-toolkit's `step`); transformers has no such schedule
        size = settings.schedule_step_size or max(1, decay_steps // 4)
        return settings.learning_rate * settings.schedule_gamma ** (after // size)
    multiplier = _transformers_schedule(settings.schedule, decay_steps, settings.schedule_cycles,
                                        settings.schedule_power)
    return settings.learning_rate * multiplier(after)
