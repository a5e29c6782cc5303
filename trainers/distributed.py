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

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over ranks (missing gradients count as zero), in one
        all-reduce of a flat buffer per dtype."""
        if self.size == 1:
            return
        by_dtype: dict = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


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
