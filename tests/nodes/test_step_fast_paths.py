"""The training step's shortcuts compute exactly what the plain step computes: LoRA weights cast to the
model's dtype once per micro-batch (not at every use), and no autocast for a model that already computes in the
training precision. Tiny bf16 models on the CPU; CUDA graphs are covered in test_cuda_graphs.py (GPU)."""
import contextlib

import pytest
import torch

from helpers import prepared, settings

OPTIONS = dict(batch_size=2, gradient_checkpointing=True, precision="bf16", learning_rate=1e-2)


def bf16_prepared(comfy_folders, tiny, arch):
    p = prepared(comfy_folders, tiny, arch=arch)
    with torch.inference_mode(False):
        p["model"] = tiny.tiny_model(arch, dtype=torch.bfloat16)
    return p


def trained(p, steps=3, **overrides):
    from eridiffusion.trainers.loop import train
    with torch.inference_mode(False):
        return train(p["model"], p["adapter"], p["latents"], p["captions"], settings(**{**OPTIONS, **overrides}),
                     steps)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_casting_lora_weights_once_per_micro_batch_changes_no_bit(comfy_folders, tiny, monkeypatch, arch):
    from eridiffusion.trainers import loop
    from eridiffusion.trainers.adapters import base
    p = bf16_prepared(comfy_folders, tiny, arch)
    uses = []
    original = base._CastAll.apply

    def counted(*args):
        uses.append(len(args) - 1)
        return original(*args)
    monkeypatch.setattr(base._CastAll, "apply", counted)
    once = trained(p)
    assert uses and uses[0] == 2 * len(p["adapter"].spec.targets)   # every down and up, in one cast
    monkeypatch.setattr(loop, "cast_once", lambda layers, dtype: contextlib.nullcontext())
    every_use = trained(p)
    assert once.history.losses == every_use.history.losses
    assert all(torch.equal(once.weights[k], every_use.weights[k]) for k in once.weights)


def test_a_bf16_model_trained_in_bf16_runs_without_autocast_like_comfyuis_inference(comfy_folders, tiny,
                                                                                    monkeypatch):
    from eridiffusion.trainers.loop import TrainingRun
    p = bf16_prepared(comfy_folders, tiny, "sdxl")
    seen = []
    original = TrainingRun._loss

    def watch(self, inputs):
        seen.append((self.autocast, self.activation_dtype))
        return original(self, inputs)
    monkeypatch.setattr(TrainingRun, "_loss", watch)
    trained(p, 1)
    with torch.inference_mode(False):
        fp32_model = tiny.tiny_model("sdxl")
    trained({**p, "model": fp32_model}, 1)      # an fp32 model trained in bf16 does need autocast
    assert seen == [(None, torch.bfloat16), (torch.bfloat16, None)]


@pytest.fixture
def pytorch_attention(monkeypatch):
    """ComfyUI's SDPA attention (what it picks on NVIDIA GPUs) instead of its CPU default."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", attention.attention_pytorch)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_checkpointed_blocks_keep_their_attention_instead_of_recomputing_it(comfy_folders, tiny, pytorch_attention,
                                                                            arch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
                CountAttention.count += 1
            return func(*args, **(kwargs or {}))

    p = bf16_prepared(comfy_folders, tiny, arch)
    runs = {}
    for recompute in (False, True):
        CountAttention.count = 0
        with CountAttention():
            runs[recompute] = (trained(p, 2, recompute_attention=recompute), CountAttention.count)
    (kept, kept_calls), (recomputed, recomputed_calls) = runs[False], runs[True]
    assert kept_calls > 0 and recomputed_calls == 2 * kept_calls      # forward + recomputation vs forward only
    assert kept.history.losses == recomputed.history.losses
    assert all(torch.equal(kept.weights[k], recomputed.weights[k]) for k in kept.weights)


@pytest.mark.parametrize("arch", ["sdxl", "flux", "sd3"])
def test_checkpointed_blocks_keep_their_adapters_rank_projections(comfy_folders, tiny, arch):
    """LoRA's x·downᵀ (a product of `rank` columns) runs once per micro-batch as without checkpointing, not again in
    the recomputation; the trained weights are the same bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode
    p = bf16_prepared(comfy_folders, tiny, arch)
    rank = p["adapter"].spec.rank

    class CountRankProducts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and args[-1].shape[-1] == rank:
                CountRankProducts.count += 1
            return func(*args, **(kwargs or {}))

    runs = {}
    for name, options in {"kept": {}, "no_checkpointing": {"gradient_checkpointing": False},
                          "all_recomputed": {"recompute_attention": True}}.items():
        CountRankProducts.count = 0
        with CountRankProducts():
            runs[name] = (trained(p, 2, compile="off", **options), CountRankProducts.count)
    assert runs["kept"][1] == runs["no_checkpointing"][1] < runs["all_recomputed"][1]
    kept, recomputed = runs["kept"][0], runs["all_recomputed"][0]
    assert kept.history.losses == recomputed.history.losses
    assert all(torch.equal(kept.weights[k], recomputed.weights[k]) for k in kept.weights)


@pytest.mark.parametrize("arch", ["sdxl", "flux", "sd3"])
def test_recompute_layers_off_keeps_the_blocks_layer_outputs_instead_of_recomputing_them(comfy_folders, tiny,
                                                                                          monkeypatch, arch):
    """A checkpointed block's LoRA Linear layers and convolutions (SDXL's) compute once per micro-batch, as without
    checkpointing, not again in the recomputation (with attention kept or recomputed); the trained weights are
    those of full recomputation bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from eridiffusion.trainers.adapters.lora import LoraLinear
    p = bf16_prepared(comfy_folders, tiny, arch)
    computed = {"linear": 0, "convolution": 0}
    outputs = LoraLinear.outputs

    def counted(*args):
        computed["linear"] += 1
        return outputs(*args)
    monkeypatch.setattr(LoraLinear, "outputs", staticmethod(counted))

    class CountConvolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                computed["convolution"] += 1
            return func(*args, **(kwargs or {}))

    runs = {}
    for name, options in {"recomputed": {}, "no_checkpointing": {"gradient_checkpointing": False},
                          "kept": {"recompute_layers": False},
                          "kept_attention_recomputed": {"recompute_layers": False, "recompute_attention": True}
                          }.items():
        computed.update(linear=0, convolution=0)
        with CountConvolutions():
            runs[name] = (trained(p, 2, compile="off", **options), dict(computed))
    once, recomputed = runs["no_checkpointing"][1], runs["recomputed"][1]
    assert 0 < once["linear"] == runs["kept"][1]["linear"] == runs["kept_attention_recomputed"][1]["linear"]
    assert once["linear"] < recomputed["linear"]
    assert once["convolution"] == runs["kept"][1]["convolution"] == runs["kept_attention_recomputed"][1]["convolution"]
    assert (once["convolution"] < recomputed["convolution"]) == (arch == "sdxl")     # the DiTs' blocks have none
    for name in ("kept", "kept_attention_recomputed"):
        kept = runs[name][0]
        assert kept.history.losses == runs["recomputed"][0].history.losses
        assert all(torch.equal(kept.weights[k], runs["recomputed"][0].weights[k]) for k in kept.weights)


def test_a_kept_linear_output_changed_in_place_after_the_forward_is_recomputed():
    """kept_linear_outputs hands the recomputation what the first forward computed, unless the block changed that
    tensor in place afterwards: then the recomputation computes it again and backward sees the right values."""
    from eridiffusion.trainers.blocks import TrainingBlockForward, kept_linear_outputs

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            h = kept_linear_outputs(lambda: (x @ self.weight,))[0]
            h.mul_(2.0)                    # in place after the first forward: the kept tensor is stale
            return (h.tanh() * x).sum()

    torch.manual_seed(0)
    block, x = Block(), torch.randn(4, 8, requires_grad=True)
    grads = {}
    for keep in (False, True):
        with torch.inference_mode(False):
            forward = TrainingBlockForward(block, checkpoint=True, out_of_place=False, keep_layers=keep)
            block.weight.grad = x.grad = None
            forward(x).backward()
        grads[keep] = (block.weight.grad.clone(), x.grad.clone())
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])


def test_auto_precision_is_the_models_own_half_precision():
    from eridiffusion.trainers.config import TrainingSettings
    from eridiffusion.trainers.loop import resolve_precision
    auto = TrainingSettings()
    assert auto.precision == "auto"
    assert [resolve_precision(auto, dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32)] == \
        ["fp16", "bf16", "bf16"]
    # fp16's loss scaling needs the optimizer on the GPU
    assert resolve_precision(TrainingSettings(optimizer_offload=True), torch.float16) == "bf16"
    assert resolve_precision(TrainingSettings(precision="fp32"), torch.float16) == "fp32"


@pytest.mark.parametrize("optimizer, offload", [("adamw", False), ("adamw8bit", False), ("adamw", True)],
                         ids=["adamw", "adamw8bit", "adamw-offloaded"])
def test_the_next_steps_micro_batch_is_queued_before_a_step_reports_and_trains_as_one_step_at_a_time(
        comfy_folders, tiny, monkeypatch, optimizer, offload):
    # train() queues step N+1's micro-batch behind step N's optimizer step (fused AdamW skips a NaN step on the
    # device: before the host reads step N's loss; AdamW8bit and the optimizer stepped on the CPU: once the host
    # has read it and stepped), so the GPU is not idle while the host reports; not before a save/sample
    # (on_every) nor after the last step.
    from eridiffusion.trainers import loop
    from eridiffusion.trainers.comfy_compat import training_mode
    p = prepared(comfy_folders, tiny)
    options = settings(**{**OPTIONS, "precision": "fp32", "optimizer": optimizer, "caption_dropout": 0.3,
                          "noise_offset": 0.05, "optimizer_offload": offload})
    micro_batches = []
    original = loop.TrainingRun._loss

    def counted(self, inputs):
        micro_batches.append(self.cursor)
        return original(self, inputs)
    monkeypatch.setattr(loop.TrainingRun, "_loss", counted)

    def seen(step, state):     # what the run has done by a step's report, and what it exports then
        return step, len(micro_batches), state.cursor, state.rng
    queued, plain = [], []
    with torch.inference_mode(False):
        trained = loop.train(p["model"], p["adapter"], p["latents"], p["captions"], options, 6,
                             on_step=lambda report: queued.append(seen(report.step, report.export())),
                             on_every=lambda run: None, every=3)
    micro_batches.clear()
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        run = loop.TrainingRun(p["model"], p["adapter"], p["latents"], p["captions"], options, end_step=6)
        for _ in range(6):
            plain.append(seen(run.step().step, run.export()))
        one_at_a_time = run.export()
    assert [s[1] for s in queued] == [2, 3, 3, 5, 6, 6]     # on_every after step 3; step 6 is the last
    assert [s[1] for s in plain] == [1, 2, 3, 4, 5, 6]
    for (step, _, cursor, rng), (plain_step, _, plain_cursor, plain_rng) in zip(queued, plain):
        assert (step, cursor) == (plain_step, plain_cursor) and torch.equal(rng, plain_rng)
    assert trained.history.losses == one_at_a_time.history.losses
    assert all(torch.equal(trained.weights[k], one_at_a_time.weights[k]) for k in trained.weights)


def _rank_trains_queued_and_one_at_a_time(rank, size, port, p, options, steps, results):
    """One gloo rank (a forked process): train() with its steps queued ahead, then one step at a time."""
    import torch.distributed
    from eridiffusion.trainers import loop
    from eridiffusion.trainers.comfy_compat import training_mode
    from eridiffusion.trainers.distributed import World
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        world, queued = World(rank, size), []
        queue_next = loop.TrainingRun._queue_next
        loop.TrainingRun._queue_next = lambda run, drawn: (queued.append(run.step_count), queue_next(run, drawn))
        with torch.inference_mode(False):
            ahead = loop.train(p["model"], p["adapter"], p["latents"], p["captions"], options, steps, world=world)
        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            run = loop.TrainingRun(p["model"], p["adapter"], p["latents"], p["captions"], options, end_step=steps,
                                   world=world)
            for _ in range(steps):
                run.step()
            plain = run.export()
        results[rank] = {"queued": queued, "ahead": (ahead.history.losses, ahead.weights),
                         "plain": (plain.history.losses, plain.weights)}
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow      # ~25 s: two forked gloo processes, each training twice
def test_ranks_queue_the_next_steps_micro_batch_too_and_train_as_one_step_at_a_time(comfy_folders, tiny):
    # Data parallel: each rank's GPU runs its next micro-batch while its host waits for the sum over ranks and
    # reads the loss; the sums and the updates are those of one step at a time, and the same on every rank.
    import socket
    import torch.multiprocessing
    p = prepared(comfy_folders, tiny)
    options = settings(**{**OPTIONS, "precision": "fp32", "caption_dropout": 0.3})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.start_processes(_rank_trains_queued_and_one_at_a_time,
                                          args=(2, port, p, options, 4, results), nprocs=2, start_method="fork")
    for rank in range(2):
        r = results[rank]
        assert r["queued"] == [0, 1, 2], rank          # steps 2-4 queued ahead (not after the last)
        (losses, weights), (plain_losses, plain_weights) = r["ahead"], r["plain"]
        assert losses == plain_losses and all(torch.equal(weights[k], plain_weights[k]) for k in weights), rank
    (losses, weights), (other_losses, other_weights) = results[0]["ahead"], results[1]["ahead"]
    assert losses == other_losses and all(torch.equal(weights[k], other_weights[k]) for k in weights)
