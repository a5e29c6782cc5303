"""AdamW8bit (trainers/optim.py) steps every adapter tensor in a few flat bitsandbytes calls, and computes what
bitsandbytes' own AdamW8bit computes tensor by tensor, bit for bit; its state saves in bitsandbytes' layout, so
a state saved by either resumes in the other and trains on identically."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from eridiffusion.trainers import fused, optim  # noqa: E402
from helpers import prepared, settings, train  # noqa: E402

# LoRA-like tensors: rank 16 against 320-1280 channels (8-bit state, some not a multiple of 256 elements),
# and tensors under bitsandbytes' 4,096-element minimum (32-bit state, as DoRA's magnitudes get)
SHAPES = [(16, 320), (320, 16), (16, 333), (7,), (16, 1280), (100, 50), (640,)]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
                               reason="needs a GPU (ERI_TEST_DEVICE=cuda)")
# on the GPU, bitsandbytes' CUDA kernel (the CPU runs its torch implementation)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])]


def tensors(seed=1, shapes=SHAPES, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in shapes]


def flat_optimizer(params, **kwargs):
    return optim._flat_adamw8bit_class(bnb)(params, lr=1e-2, weight_decay=1e-2, **kwargs)


def step_both(runs, seed):
    """One step of each (params, optimizer) with the same gradients."""
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=generator).to(p.device) for p in runs[0][0]]
    for params, optimizer in runs:
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        optimizer.step()


def quantized_entries(state_dict):
    """(tensor index, key) -> value, bitsandbytes' wrapped quantization state unwrapped."""
    out = {}
    for i, entry in state_dict["state"].items():
        for key, value in {**entry, **entry.get("__bnb_optimizer_quant_state__", {})}.items():
            if key != "__bnb_optimizer_quant_state__":
                out[(i, key)] = value
    return out


def same(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("device", DEVICES)
def test_flat_adamw8bit_steps_as_bitsandbytes_does_tensor_by_tensor_and_saves_its_state_layout(device):
    ours, theirs = tensors(device=device), tensors(device=device)
    reference = bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=1e-2)
    flat = flat_optimizer(ours)
    runs = [(theirs, reference), (ours, flat)]
    for step in range(5):
        step_both(runs, seed=10 + step)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step
    assert not torch.equal(ours[0], tensors(device=device)[0])
    saved, expected = flat.state_dict(), reference.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    ours_state, their_state = quantized_entries(saved), quantized_entries(expected)
    assert ours_state.keys() == their_state.keys()
    assert all(same(ours_state[k], their_state[k]) for k in their_state)
    assert any(v.dtype == torch.uint8 for v in their_state.values() if isinstance(v, torch.Tensor))
    assert any(v.dtype == torch.float32 and v.numel() == 7 for v in their_state.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("device", DEVICES)
def test_a_saved_state_resumes_in_either_optimizer_and_both_train_on_identically(device):
    params = tensors(device=device)
    reference = bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=1e-2)
    for step in range(3):
        step_both([(params, reference)], seed=20 + step)
    # bitsandbytes' state into ours, and ours (after loading it) back into bitsandbytes'
    resumed = [p.detach().clone().requires_grad_() for p in params]
    flat = flat_optimizer(resumed)
    flat.load_state_dict(reference.state_dict())
    again = [p.detach().clone().requires_grad_() for p in params]
    from_flat = bnb.optim.AdamW8bit(again, lr=1e-2, weight_decay=1e-2)
    from_flat.load_state_dict(flat.state_dict())
    runs = [(params, reference), (resumed, flat), (again, from_flat)]
    for step in range(3):
        step_both(runs, seed=30 + step)
        assert all(torch.equal(a, b) for a, b in zip(params, resumed)), step
        assert all(torch.equal(a, b) for a, b in zip(params, again)), step


def skipping_step(optimizer, params, seed, flag):
    """One step_skipping_on_device step, found_inf = flag; NaN gradients where the flag is set, as a bad step
    gives them."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, generator=generator).to(p.device)
        p.grad.copy_(torch.full_like(g, float("nan")) if flag else g)
    optim.step_skipping_on_device(optimizer, torch.tensor([flag], device=params[0].device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [True, False], ids=["flag-copy-kernel", "clone-and-where"])
def test_a_step_flagged_on_the_device_is_skipped_and_the_next_steps_are_those_of_a_run_without_it(
        device, kernel, monkeypatch):
    # The training loop steps before the host reads the loss (TrainingRun.step's `ahead`): a NaN step is skipped
    # by the device flag found_inf, bitsandbytes' kernel having no such flag. On the CPU, the flag copy's Triton
    # kernel runs interpreted, as the GPU runs it compiled; without Triton (or ERI_FUSED_KERNELS=0), a clone and
    # a torch.where keep and put back the state.
    monkeypatch.setitem(fused.ENABLED, "flag_copy", kernel)
    skipped, clean = tensors(device=device), tensors(device=device)
    flagged, reference = flat_optimizer(skipped), flat_optimizer(clean)
    flagged.interpret_kernels = reference.interpret_kernels = True
    assert fused.flag_copy_takes(skipped[0], interpret=True) == (kernel and fused.triton_available())
    for optimizer, params in ((flagged, skipped), (reference, clean)):
        skipping_step(optimizer, params, seed=40, flag=0.0)
    before = quantized_entries(flagged.state_dict())
    skipping_step(flagged, skipped, seed=41, flag=1.0)
    flagged.uncount_skipped_step()      # the loop, once its host has read the flag
    assert all(torch.equal(a, b) for a, b in zip(skipped, clean))
    after = quantized_entries(flagged.state_dict())
    assert after.keys() == before.keys() and all(same(after[k], before[k]) for k in before)
    for step in range(2):
        for optimizer, params in ((flagged, skipped), (reference, clean)):
            skipping_step(optimizer, params, seed=42 + step, flag=0.0)
        assert all(torch.equal(a, b) for a, b in zip(skipped, clean)), step
    assert quantized_entries(flagged.state_dict()).keys() == quantized_entries(reference.state_dict()).keys()
    assert all(same(a, b) for a, b in zip(quantized_entries(flagged.state_dict()).values(),
                                           quantized_entries(reference.state_dict()).values()))


def test_parameter_groups_keep_their_own_learning_rate_and_tensors():
    unet, text_encoder = tensors(seed=1), tensors(seed=2, shapes=[(16, 768), (768, 16)])
    flat = optim._flat_adamw8bit_class(bnb)([{"params": unet}, {"params": text_encoder}], lr=1e-2)
    assert len(flat.param_groups) == 2
    flat.param_groups[1]["lr"] = 0.0
    before = [t.detach().clone() for t in text_encoder]
    step_both([(unet + text_encoder, flat)], seed=40)
    assert all(torch.equal(a, b) for a, b in zip(text_encoder, before))
    assert not torch.equal(unet[0], tensors(seed=1)[0])
    assert [g["params"] for g in flat.state_dict()["param_groups"]] == [list(range(7)), [7, 8]]


def test_training_with_adamw8bit_calls_bitsandbytes_per_flat_tensor_not_per_adapter_tensor(comfy_folders, tiny,
                                                                                            monkeypatch):
    import bitsandbytes.functional as F
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from helpers import run
    p = prepared(comfy_folders, tiny)
    adapter = run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=16, alpha=16.0, target="all_linear",
                  seed=0, dtype="fp32")[0]
    calls = []
    for name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit"):
        original = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _original=original, _name=name, **k: calls.append(_name)
                            or _original(*a, **k))
    _, trained, _ = train(p, 2, adapter=adapter, optimizer="adamw8bit")
    tensors_trained = len(trained.optimizer["state"])
    assert tensors_trained > 20
    # per step: one flat tensor with 8-bit state and one with 32-bit state (the small ones)
    assert 2 <= len(calls) <= 2 * 2 and "optimizer_update_8bit_blockwise" in calls


@pytest.mark.gpu
@needs_gpu
def test_a_step_queues_its_kernels_without_waiting_for_the_gpu():
    # bitsandbytes synchronizes after every tensor (its paged optimizers need it); the training loop queues the
    # next step's micro-batch while the GPU steps (TrainingRun.step's `ahead`)
    params = tensors(device="cuda")
    optimizer = flat_optimizer(params)
    step_both([(params, optimizer)], seed=3)       # (the first step sets the state up)
    for p, g in zip(params, tensors(seed=4, device="cuda")):
        p.grad.copy_(g.detach())
    before = [p.detach().clone() for p in params]
    torch.cuda.set_sync_debug_mode("error")        # a synchronizing call raises
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params))
