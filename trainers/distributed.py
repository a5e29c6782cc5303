"""Data parallel training over torch.distributed (torchrun): the same training as one process with N× the batch.

Every rank draws the whole global batch's randomness (order, caption dropout, noise, timesteps) from the same
generator, so all ranks stay in step, and computes only its contiguous share of the samples. Its loss is its
share's mean scaled by share / global batch, so the gradients summed over ranks (one all-reduce per optimizer
step) are the gradient of the global batch's mean loss: the same update on every rank. Rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous part of `count` samples (sizes differ by at most one; may be empty)."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over all ranks (a new tensor; every rank gets the result)."""
        out = tensor.detach().clone()
        if self.size > 1:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def gradient_buckets(self, params: list[torch.Tensor]) -> "GradientBuckets":
        """Every parameter's gradient made part of a flat tensor that one all-reduce sums over the ranks."""
        return GradientBuckets(params, self.size)

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


class GradientBuckets:
    """The parameters' gradients as parts of a few flat tensors, summed over the ranks in place: one all-reduce per
    flat tensor and step, with no concatenation before it and no copy back into each gradient after it (an SDXL
    LoRA has 1,400). Gradients that already share a storage (AdamW8bit's flat gradients, trainers/optim.py) are
    summed through it, padding included (zeros on every rank); the others become views of a new buffer per dtype
    and device. Call it after the gradients exist and before anything keeps references to them."""

    def __init__(self, params: list[torch.Tensor], size: int):
        self.size = size
        self.flats: list[torch.Tensor] = []
        shared, loose = {}, {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            storage = grad.untyped_storage()
            if grad.numel() * grad.element_size() < storage.nbytes():   # a view of a larger flat gradient
                shared.setdefault(storage.data_ptr(), (storage, grad.dtype, grad.device))
            else:
                loose.setdefault((grad.dtype, grad.device), []).append(p)
        for storage, dtype, device in shared.values():
            whole = torch.empty(0, dtype=dtype, device=device)
            whole.set_(storage, 0, (storage.nbytes() // whole.element_size(),), (1,))
            self.flats.append(whole)
        for (dtype, device), group in loose.items():
            flat = torch.empty(sum(p.grad.numel() for p in group), dtype=dtype, device=device)
            offset = 0
            for p in group:
                n = p.grad.numel()
                with torch.no_grad():
                    flat[offset:offset + n].copy_(p.grad.reshape(-1))
                p.grad = flat[offset:offset + n].view_as(p)
                offset += n
            self.flats.append(flat)

    def sum_over_ranks(self) -> None:
        if self.size > 1:
            for flat in self.flats:
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: str) -> World | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL on CUDA, gloo on
    the CPU. Returns None when not launched by torchrun with more than one process."""
    if not launched_by_torchrun():
        return None
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size())


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
