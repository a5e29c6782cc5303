"""Data parallel gradients: summed over the ranks in place, in flat tensors the gradients are parts of (two gloo
processes on the CPU)."""
import socket

import torch
import torch.distributed
import torch.multiprocessing

from eridiffusion.trainers.distributed import World


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        # two loose gradients of different dtypes, and two that are views of one flat gradient with padding
        # (AdamW8bit's layout, trainers/optim.py)
        loose = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]
        flat_grad = torch.zeros(16)
        shared = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
        shared[0].grad, shared[1].grad = flat_grad[0:6].view(2, 3), flat_grad[8:12]
        loose[0].grad = torch.full((3, 4), 7.0)            # a value from before: kept
        params = loose + shared
        buckets = World(rank, size).gradient_buckets(params)
        kept = loose[0].grad.clone()
        gradients = [p.grad for p in params]                # what the step copies each micro-batch's gradients into
        sums = []
        for step in range(2):
            torch._foreach_copy_(gradients, [torch.full_like(g, (rank + 1) * 10.0 ** step + i)
                                             for i, g in enumerate(gradients)])
            buckets.sum_over_ranks()
            sums.append([p.grad.clone() for p in params])
        results[rank] = {"kept": kept, "sums": sums, "flats": len(buckets.flats),
                         "same_grads": all(p.grad is g for p, g in zip(params, gradients)),
                         "shared_is_flat": shared[1].grad.untyped_storage().data_ptr()
                         == flat_grad.untyped_storage().data_ptr(), "padding": flat_grad[12:].clone()}
    finally:
        torch.distributed.destroy_process_group()


def test_gradients_are_summed_over_the_ranks_in_place_in_flat_tensors():
    size = 2
    results = torch.multiprocessing.Manager().dict()
    # forked: the processes inherit the test session's imports (eridiffusion is registered by conftest)
    torch.multiprocessing.start_processes(_rank, args=(size, _free_port(), results), nprocs=size,
                                          start_method="fork")
    for rank in range(size):
        r = results[rank]
        assert torch.equal(r["kept"], torch.full((3, 4), 7.0))
        assert r["flats"] == 3 and r["same_grads"] and r["shared_is_flat"]   # float32, float64, the shared one
        assert torch.equal(r["padding"], torch.zeros(4))
        for step, sums in enumerate(r["sums"]):
            for i, summed in enumerate(sums):
                expected = sum((q + 1) * 10.0 ** step + i for q in range(size))
                assert torch.equal(summed, torch.full_like(summed, expected)), (rank, step, i)
