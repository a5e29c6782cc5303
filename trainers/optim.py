"""Optimizers and learning-rate schedules by name."""
from __future__ import annotations

import functools

import torch

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
def _adamw8bit(params, s: TrainingSettings, device):
    bnb = _package("bitsandbytes", "adamw8bit", "bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=s.learning_rate, weight_decay=s.weight_decay)


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


def make_optimizer(params, settings: TrainingSettings, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[settings.optimizer](list(params), settings, device)


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
    (torch's fused Adam/AdamW, which GradScaler drives the same way): a NaN step is then skipped without the
    host reading the loss first."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
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
        if callable(getattr(self.inner, "train", None)):   # schedule-free: the weights on the device follow
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
