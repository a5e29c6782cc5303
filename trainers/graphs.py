"""The GPU work of a micro-batch — noisy latents, the model, the loss, backward into the adapter's gradients —
captured as a CUDA graph once per input shape and replayed, so the host launches one graph instead of the
thousands of kernels ComfyUI's models and the adapter layers launch one by one.

Why: SDXL at batch 1 is launch-bound (its UNet's forward takes ~2× as long on the host as on the GPU), and
every architecture idles the GPU whenever Python falls behind. torch.compile needs minutes per shape (and a
cache on disk to bring that down); capturing a graph takes one step's time, so nothing needs caching: a new
bucket costs its warm-up steps and one capture, a few seconds at most.

What makes a micro-batch capturable, and what the loop keeps to:
- its inputs are tensors already on the device (`Architecture.conditioning` does the host work first), and
  Python control flow inside depends only on their shapes and dtypes, which are the graph's key;
- nothing inside syncs with the host or draws random numbers on the device: noise and timesteps come from the
  run's CPU generator, and the loss is read once per step, after all micro-batches;
- gradients are outputs (torch.autograd.grad), which the loop adds up outside the graph;
- the optimizer step, clipping, learning rate and NaN check run eagerly after the replays (a few fused kernels).

Each key runs eagerly for its first WARMUP_STEPS micro-batches (real training, on a side stream as PyTorch's
whole-network capture recipe asks), then is captured; replays give the same numbers as eager steps. Graphs
share one memory pool: they replay one after another on one stream. When capture fails — a forward that does
need the host, e.g. weights ComfyUI streams in from the CPU — that key trains eagerly and a warning says why.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

WARMUP_STEPS = 2
Inputs = dict[str, torch.Tensor]
Outputs = object     # what micro_batch returns: tensors, tuples of tensors


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One warm-up stream per device for the whole process: cuBLAS keeps a workspace (~64 MiB on an H100) for
    every stream it has run on and never frees it, so a new stream per training run would leak that much."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _key(inputs: Inputs, extra: tuple) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items())) + extra


class GraphedMicroBatches:
    """Runs `micro_batch(inputs) -> outputs` (tensors, or tuples of them: the loss and its gradients) eagerly the
    first times it sees an input signature and as a replayed CUDA graph after that. A replay's outputs are the
    graph's own tensors: use them before the next call."""

    def __init__(self, micro_batch: Callable[[Inputs], Outputs], device: torch.device, warmup: int = WARMUP_STEPS):
        self.micro_batch = micro_batch
        self.device = device
        self.warmup = warmup
        self.side_stream = _side_stream(device)
        self.reset()

    def reset(self) -> None:
        """Forget every graph: their addresses are stale once the model's weights have moved (another model
        was loaded in between, e.g. for sampling)."""
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple | None] = {}   # key -> (graph, static inputs, static outputs); None: eager
        self.pool = None
        self.captures = 0

    def __call__(self, inputs: Inputs, extra: tuple = ()) -> Outputs:
        key = _key(inputs, extra)
        if key not in self.graphs:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.warmup:
                return self._on_side_stream(inputs)
            self.graphs[key] = self._capture(inputs)
        entry = self.graphs[key]
        if entry is None:
            return self.micro_batch(inputs)
        graph, static_inputs, static_outputs = entry
        for name, tensor in inputs.items():
            static_inputs[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return static_outputs

    def _on_side_stream(self, inputs: Inputs) -> Outputs:
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            outputs = self.micro_batch(inputs)
        current.wait_stream(self.side_stream)
        return outputs

    def _capture(self, inputs: Inputs):
        static_inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        try:
            # thread_local: other threads of the ComfyUI server may use CUDA while this one captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_outputs = self.micro_batch(static_inputs)
        except Exception as error:     # capture never ran a kernel: nothing was trained twice or lost
            logging.warning("EriDiffusion: CUDA graph capture failed for inputs %s (%s: %s); these batches "
                            "train without graphs. Set compile to 'off' to skip capturing.",
                            ", ".join(f"{name} {tuple(t.shape)}" for name, t in inputs.items()),
                            type(error).__name__, error)
            torch.cuda.synchronize(self.device)
            return None
        self.captures += 1
        return graph, static_inputs, static_outputs


class EagerMicroBatches:
    """The same interface without graphs (training on the CPU, or compile 'off')."""

    captures = 0

    def __init__(self, micro_batch: Callable[[Inputs], Outputs]):
        self.micro_batch = micro_batch

    def __call__(self, inputs: Inputs, extra: tuple = ()) -> Outputs:
        return self.micro_batch(inputs)

    def reset(self) -> None:
        pass
