"""Training within a GPU memory budget (TrainingSettings.memory_budget_gb): the frozen base weights that do not
fit stay in CPU memory and ComfyUI streams them to the GPU layer by layer.

ComfyUI's own lowvram machinery does it, not a second one. The training clone is loaded through
`load_models_gpu` as always (other models are unloaded to make room, the clone is registered as loaded, Cancel
and the next prompt unload it), then `ModelPatcher.partially_unload` — what ComfyUI itself calls when it needs
memory back — moves weights to the offload device until what stays resident fits the budget left after the
training's own needs. Each moved layer gets `comfy_cast_weights`: its forward copies its weight to the GPU
through `comfy.ops.cast_bias_weight` (from pinned memory) and drops the copy afterwards. Gradient checkpointing
(trainers/blocks.py) saves nothing of a block's forward; the block's recomputation in backward copies its weights
again, so of the streamed weights only those of the block being computed are on the GPU at a time.

What the rest of the step does with streamed layers: adapters wrap the layer's own forward (ComfyUI's cast) and
read its weight through `comfy.ops.cast_bias_weight` (DoRA's norm), so they see the base weight as inference does;
LoRA's fused LoraLinear and the fused GroupNorm check `comfy_cast_weights` per call and fall back to the layer's
forward; CUDA graphs are off (a replay would reuse the copies made while capturing, and the copies need the host).

ComfyUI's own per-layer copies (layers outside the blocks) are made on the compute stream while a micro-batch
trains (`synchronous_copies`: ComfyUI's async offload off, as its --disable-async-offload does). ComfyUI's
side-stream copies are made for inference, where a copied weight is used once and dropped right after its op: the
side stream then waits for that op before its memory can be reused. In training, autograd keeps the copied weight
of a recomputed block until that block's backward (the input gradient needs it); freed after kernels the side
stream never waited for, its memory could be reused by the next copy while the backward still reads it, and in
0.33 without cudaMallocAsync the copy is a view of a per-stream cast buffer that the layer after next overwrites.

The blocks' streamed weights (nearly all of them) are copied ahead instead (`BlockPrefetcher`): the next block's
on a side stream of our own while the current block computes, whole blocks at a time, with `record_stream` so
that autograd's late use is ordered with any reuse of their memory. ComfyUI 0.33's block prefetch
(comfy/model_prefetch.py) serves its dynamic VRAM (comfy-aimdo) only, and training runs on a dynamic model's
non-dynamic delegate (comfy_compat.trainable_patcher), which the budget then applies to.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re

import torch
from torch.utils._python_dispatch import _disable_current_modes

import comfy.model_management

GIB = 1 << 30
# The optimizer's state per adapter parameter, in fp32 copies (AdamW's two moments; the estimate assumes it)
OPTIMIZER_STATE_COPIES = 2
# Adapter parameters are held ~3 times over during a step: the weights, autograd's gradients and their sum
ADAPTER_COPIES = 3
def training_needs(params, optimizer_offload: bool, model, latent_shapes, activation_factor: float) -> int:
    """Bytes of GPU memory the training needs besides the model's weights (an estimate): the adapter's parameters
    and gradients, the optimizer's state (none with optimizer_offload), and the activations of the largest batch:
    ComfyUI's estimate for inference (`BaseModel.memory_required`) times the architecture's `activation_factor`
    (with gradient checkpointing a step holds each block's input, the attention outputs kept, and one block's
    activations; Architecture.activation_factor says what was measured)."""
    adapter = sum(p.numel() * p.element_size() for p in params)
    state = 0 if optimizer_offload else sum(p.numel() * 4 for p in params) * OPTIMIZER_STATE_COPIES
    activations = activation_factor * max((model.memory_required(shape) for shape in latent_shapes), default=0)
    return int(adapter * ADAPTER_COPIES + state + activations)


def staged_bytes(blocks) -> int:
    """What streaming adds to the training's needs: two of the largest of `blocks`, the streamed weights
    BlockPrefetcher holds on the device (the block computing and the next)."""
    return 2 * max((sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks), default=0)


def resident_budget(budget_gb: float, needs: int, staged: int, model_bytes: int) -> int | None:
    """Bytes of the model's weights that stay on the GPU under a budget of `budget_gb` GiB (None: no budget, or
    the whole model fits beside the training's `needs`); when they do not all fit, the staged blocks' `staged`
    bytes come out of the budget too."""
    if not budget_gb:
        return None
    if model_bytes + needs <= budget_gb * GIB:
        return None
    return max(0, int(budget_gb * GIB) - needs - staged)


def streamed_layers(model: torch.nn.Module) -> list[str]:
    """The layers ComfyUI left in CPU memory (lowvram) and copies to the device at each use: `comfy_cast_weights`
    set, and `prev_comfy_cast_weights` keeping what it was before (fp8 layers cast per use when loaded, too)."""
    return [name for name, m in model.named_modules()
            if getattr(m, "comfy_cast_weights", False) and hasattr(m, "prev_comfy_cast_weights")]


def load(patchers: list, resident: int | None) -> None:
    """The training clones on their device: all of their weights (resident None), or the first one (the diffusion
    model) with at most `resident` bytes of its weights on the device and the rest streamed from CPU memory."""
    if resident is None:
        comfy.model_management.load_models_gpu(patchers, force_full_load=True)
    else:
        with loads_at_most(patchers, resident):
            comfy.model_management.load_models_gpu(patchers, force_full_load=False)
        model = patchers[0]
        excess = model.loaded_size() - resident
        if excess > 0:
            model.partially_unload(model.offload_device, excess)
    for patcher in patchers:
        without_inference_tensors(patcher.model, patcher.load_device)


@contextlib.contextmanager
def loads_at_most(patchers: list, resident: int):
    """While inside, ComfyUI's `load_models_gpu` puts at most `resident` bytes of the first patcher's weights on
    its device (the others whole), instead of what it would load of a model that does not fit: up to 40 % of the
    free memory's worth (MIN_WEIGHT_MEMORY_RATIO). `partially_unload` would take the excess back afterwards, but
    the peak of the load itself would pass the budget on a card larger than it. ComfyUI's own knob for memory
    kept from models, EXTRA_RESERVED_VRAM (its --reserve-vram), holds back the rest of the free memory for the
    load's duration; it also makes the load unload the other models on the device, as a model that does not fit
    does on a card of the budget's size."""
    mm = comfy.model_management
    device = torch.device(patchers[0].load_device)
    if device.type == "cpu" or not hasattr(mm, "EXTRA_RESERVED_VRAM"):
        yield
        return
    saved = mm.EXTRA_RESERVED_VRAM
    # load_models_gpu loads a model with lowvram_model_memory = free (its own loaded bytes counted as free) -
    # minimum_inference_memory(), which is a fixed floor plus EXTRA_RESERVED_VRAM; the others load first, whole
    floor = mm.minimum_inference_memory() - mm.extra_reserved_memory()
    free = mm.get_free_memory(device) + sum(p.loaded_size() for p in patchers)
    others = sum(p.model_size() for p in patchers[1:])
    mm.EXTRA_RESERVED_VRAM = max(saved, int(free - floor - others - resident))
    try:
        yield
    finally:
        mm.EXTRA_RESERVED_VRAM = saved


def without_inference_tensors(module: torch.nn.Module, device) -> int:
    """Replaces every inference tensor on `device` among `module`'s parameters and buffers by a normal copy;
    returns how many.
    ComfyUI runs every node under torch.inference_mode, so a model that a sampler moved to the GPU before
    training (and that stayed loaded) holds inference tensors, which autograd refuses to save for backward
    ("Inference tensors cannot be saved for backward"). The copies hold the same values, so the MODEL's other
    clones compute what they computed; ComfyUI's own patching reaches the new tensors by their paths. Weights
    streamed from CPU memory (memory_budget_gb) stay as they are (pinned): what trains is their device copies."""
    device = torch.device(device)
    replaced = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, param in list(m._parameters.items()):
                if (param is not None and type(param.data) is torch.Tensor and param.is_inference()
                        and param.device == device):
                    m._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    replaced += 1
            for name, buffer in list(m._buffers.items()):
                if (buffer is not None and type(buffer) is torch.Tensor and buffer.is_inference()
                        and buffer.device == device):
                    m._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced


@contextlib.contextmanager
def synchronous_copies(active: bool):
    """While inside (and `active`): ComfyUI copies streamed weights on the compute stream, not on its async-offload
    side streams (comfy.model_management.NUM_STREAMS 0, read at each cast); restored on the way out."""
    before = getattr(comfy.model_management, "NUM_STREAMS", 0)
    if not active or not before:
        yield
        return
    comfy.model_management.NUM_STREAMS = 0
    try:
        yield
    finally:
        comfy.model_management.NUM_STREAMS = before


# ------------------------------------------------------------------------------------------- block prefetch
# Devices whose streamed blocks are staged ahead of use (on the CPU nothing streams: the tests add it to check the
# staging's bookkeeping, which then clones weights)
PREFETCH_DEVICES = {"cuda"}


class BlockPrefetcher:
    """Copies the streamed weights of the block that runs next to the GPU on a side stream while the current block
    computes, so that the copies overlap compute instead of preceding each layer's kernels.

    A micro-batch enters the blocks in the same order every time (the forward pass, then gradient checkpointing's
    recomputation in backward, in reverse): the order the last micro-batch entered them in predicts the next block,
    and the first block of a micro-batch is staged when it starts. A staged block's streamed layers get their
    device copies as parameters while it runs (ComfyUI's cast then finds the weight on the device and copies
    nothing: fp8 weights are still cast to the compute dtype there, LoRA patches of the MODEL still applied), and
    their CPU parameters back when it returns. The copies are allocated on the side stream; the compute stream
    waits for them before the block runs, and `record_stream` keeps their memory from being reused while the
    compute stream (autograd's backward of the recomputed block) may still read them. At most two blocks are staged
    at a time, besides the copies autograd holds for the backward under way (staged_bytes counts two of the
    largest block)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.enabled = self.device.type in PREFETCH_DEVICES
        self.stream = torch.cuda.Stream(self.device) if self.enabled and self.device.type == "cuda" else None
        self.blocks: list[torch.nn.Module] = []
        self.streamed: list[list[tuple[torch.nn.Module, str]]] = []
        self.staged: dict[int, tuple[object, dict]] = {}
        self.order: list[int] = []       # the blocks the last micro-batch entered, in order
        self.entered: list[int] = []     # those this one entered so far

    def register(self, block: torch.nn.Module) -> int:
        """Adds a block; returns its index."""
        self.blocks.append(block)
        return len(self.blocks) - 1

    def _stageable(self, module: torch.nn.Module, name: str) -> bool:
        """A streamed layer's plain tensor (a QuantizedTensor keeps ComfyUI's per-layer cast) in CPU memory."""
        param = module._parameters.get(name)
        return (getattr(module, "comfy_cast_weights", False) and hasattr(module, "prev_comfy_cast_weights")
                and param is not None and type(param.data) is torch.Tensor
                and (param.device != self.device or self.device.type == "cpu"))

    @contextlib.contextmanager
    def micro_batch(self):
        """Around a micro-batch: which layers stream is read again (ComfyUI may have loaded the model again since),
        the first block is staged, and nothing stays staged after it."""
        self.streamed = [[(m, name) for m in block.modules() for name in ("weight", "bias")
                          if self._stageable(m, name)] for block in self.blocks] if self.enabled else []
        self.entered = []
        if self.order:
            with _disable_current_modes():
                self._stage(self.order[0])
        try:
            yield
        finally:
            self.staged.clear()
            self.order, self.entered = self.entered, []

    def _stage(self, index: int | None) -> None:
        if index is None or index in self.staged or not self.streamed or not self.streamed[index]:
            return
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            copies = {(m, name): torch.nn.Parameter(m._parameters[name].to(self.device, non_blocking=True, copy=True),
                                                    requires_grad=False)
                      for m, name in self.streamed[index]}
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        self.staged[index] = (ready, copies)

    def _upcoming(self) -> int | None:
        """The block the last micro-batch entered after this point, if this one has followed it so far."""
        at = len(self.entered)
        if at < len(self.order) and self.order[:at] == self.entered:
            return self.order[at]
        return None

    @contextlib.contextmanager
    def running(self, index: int):
        """While block `index` runs: its streamed layers use device copies, and the next block's are being made."""
        if not self.streamed or not self.streamed[index]:
            self.entered.append(index)
            yield
            return
        # Outside the block's own ops: selective checkpointing records the ops of a block's forward and expects the
        # same ones when recomputing it, and the copies made differ between the two passes
        with _disable_current_modes():
            self._stage(index)
            ready, copies = self.staged[index]
            if ready is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(ready)
                for copy in copies.values():
                    copy.record_stream(compute)
            self.entered.append(index)
            upcoming = self._upcoming()
            for stale in [i for i in self.staged if i not in (index, upcoming)]:
                del self.staged[stale]
            self._stage(upcoming)
        originals = {(m, name): m._parameters[name] for m, name in copies}
        try:
            for (m, name), copy in copies.items():
                m._parameters[name] = copy
            yield
        finally:
            for (m, name), original in originals.items():
                m._parameters[name] = original
            if upcoming != index:
                self.staged.pop(index, None)


# ---------------------------------------------------------------------------------------------- out of memory
_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) ?(GiB|MiB|KiB|B)\b")
_UNITS = {"GiB": GIB, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}


def tried_to_allocate(error: BaseException) -> int:
    """The size of the allocation that failed, from torch's message ("Tried to allocate 2.00 GiB"); 0 if absent."""
    found = _TRIED.search(str(error))
    return int(float(found[1]) * _UNITS[found[2]]) if found else 0


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# What a budget leaves of the device's memory for what the allocator does not count (CUDA context, fragmentation)
HEADROOM = 0.1


def budget_advice(budget_gb: float, attempted: int, total: int, resident: int) -> str:
    """What to set memory_budget_gb to after an out-of-memory error: `attempted` bytes were needed at least (the
    peak so far plus the allocation that failed), the device has `total`, and `resident` bytes of the model's
    weights were on it. Without a budget: the device's memory less HEADROOM; with one (its estimate of the
    training's own needs fell short): that budget lowered by the shortfall and half a GiB. In steps of 0.5 GiB.
    "" when nothing is known (not CUDA); a line saying the budget cannot help when streaming every weight on the
    device would still not free enough."""
    if total <= 0 or attempted <= 0:
        return ""
    over = max(0, attempted - total)
    if resident <= over:
        return (f"memory_budget_gb cannot help: the step needed {_gib(attempted)} of the GPU's {_gib(total)} with "
                f"only {_gib(resident)} of the model's weights on it")
    card = total * (1 - HEADROOM) / GIB
    suggested = min(budget_gb, card) - over / GIB - 0.5 if budget_gb else card
    suggested = math.floor(suggested * 2) / 2
    if suggested <= 0:
        return ""
    now = f"memory_budget_gb is {budget_gb:g}; lower it" if budget_gb else "set memory_budget_gb"
    return (f"the step needed at least {_gib(attempted)} and the GPU has {_gib(total)}: {now} to {suggested:g} "
            f"(Training settings) to keep part of the model's weights ({_gib(resident)} on the GPU) in CPU memory "
            f"and stream them")


def device_memory(device: torch.device, error: BaseException) -> tuple[int, int]:
    """(bytes the step needed at least, the device's total) after an out-of-memory error; (0, 0) off CUDA."""
    if torch.device(device).type != "cuda":
        return 0, 0
    peak = torch.cuda.max_memory_allocated(device)
    attempted = max(peak, torch.cuda.memory_allocated(device) + tried_to_allocate(error))
    return attempted, torch.cuda.get_device_properties(device).total_memory


def log_streaming(model: torch.nn.Module, resident: int | None, needs: int, budget_gb: float) -> int:
    """One line saying how many layers stream (resident None: the whole model fits); returns that count."""
    streamed = len(streamed_layers(model))
    if resident is None:
        logging.info("EriDiffusion: memory_budget_gb %g: the whole model fits beside what training needs (~%s); "
                     "nothing streams", budget_gb, _gib(needs))
        return streamed
    if resident == 0:
        logging.warning("EriDiffusion: memory_budget_gb %g is below what the training itself is estimated to need "
                        "(~%s): every layer streams, and the step may still use more than the budget",
                        budget_gb, _gib(needs))
    logging.info("EriDiffusion: memory_budget_gb %g: training needs ~%s besides the weights, %s of weights stay "
                 "on the GPU, %d layers stream from CPU memory", budget_gb, _gib(needs), _gib(resident), streamed)
    return streamed
