"""AdamW on the GPU (trainers/optim.py: FlatAdamW) steps every adapter tensor of a parameter group as one flat
tensor in torch's fused kernel, and computes what torch's AdamW computes tensor by tensor, bit for bit; its state
saves in torch's layout, so a state saved by either resumes in the other and trains on identically. On the CPU
torch's kernel rounds a tensor's last elements (after its last full vector) in scalar code, an ulp apart from its
vector code: there the comparisons allow that ulp (and training itself keeps torch's AdamW)."""
import copy

import pytest
import torch

from eridiffusion.trainers import optim
from helpers import prepared, train

# LoRA-like tensors: rank 16 against 320-1280 channels, odd sizes, a DoRA magnitude-like vector, and a bf16 one
# (a flat tensor of its own)
SHAPES = [(16, 320), (320, 16), (16, 333), (7,), (16, 1280), (100, 50), (640,)]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
                               reason="needs a GPU (ERI_TEST_DEVICE=cuda)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])]
OPTIONS = dict(lr=1e-2, weight_decay=1e-2, fused=True)


def tensors(seed=1, shapes=SHAPES, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    made = [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in shapes]
    return made + [torch.randn((16, 64), generator=generator).to(device, torch.bfloat16).requires_grad_()]


def step_all(runs, seed):
    """One step of each (params, optimizer) with the same gradients."""
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in runs[0][0]]
    for params, optimizer in runs:
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        optimizer.step()


def same(a, b):
    if not isinstance(a, torch.Tensor):
        return a == b
    if a.device.type == "cpu":      # (see the module's docstring)
        return torch.allclose(a.float(), b.float(), rtol=2 ** -20, atol=0)
    return torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_adamw_steps_as_torchs_adamw_does_tensor_by_tensor_and_saves_its_state_layout(device):
    ours, theirs = tensors(device=device), tensors(device=device)
    reference = torch.optim.AdamW(theirs, **OPTIONS)
    flat = optim.FlatAdamW(ours, **OPTIONS)
    assert len(optim.flat_parameters(flat)) == 2          # fp32 and bf16
    runs = [(theirs, reference), (ours, flat)]
    for step in range(5):
        step_all(runs, seed=10 + step)
        assert all(same(a, b) for a, b in zip(ours, theirs)), step
    assert not torch.equal(ours[0], tensors(device=device)[0])
    saved, expected = flat.state_dict(), reference.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for i, entry in expected["state"].items():
        assert saved["state"][i].keys() == entry.keys()
        assert all(same(saved["state"][i][k], v) for k, v in entry.items()), i


@pytest.mark.parametrize("device", DEVICES)
def test_a_saved_state_resumes_in_either_adamw_and_both_train_on_identically(device):
    params = tensors(device=device)
    reference = torch.optim.AdamW(params, **OPTIONS)
    for step in range(3):
        step_all([(params, reference)], seed=20 + step)
    # (copies, as a saved .eri-state is: torch's optimizers load a state's tensors without copying them)
    resumed = [p.detach().clone().requires_grad_() for p in params]
    flat = optim.FlatAdamW(resumed, **OPTIONS)
    flat.load_state_dict(copy.deepcopy(reference.state_dict()))
    again = [p.detach().clone().requires_grad_() for p in params]
    from_flat = torch.optim.AdamW(again, **OPTIONS)
    from_flat.load_state_dict(copy.deepcopy(flat.state_dict()))
    runs = [(params, reference), (resumed, flat), (again, from_flat)]
    for step in range(3):
        step_all(runs, seed=30 + step)
        assert all(same(a, b) for a, b in zip(params, resumed)), step
        assert all(same(a, b) for a, b in zip(params, again)), step


def test_parameter_groups_keep_their_own_learning_rate_and_tensors():
    unet, text_encoder = tensors(seed=1), tensors(seed=2, shapes=[(16, 768), (768, 16)])
    flat = optim.FlatAdamW([{"params": unet}, {"params": text_encoder}], **OPTIONS)
    flat.param_groups[1]["lr"] = 0.0
    before = [t.detach().clone() for t in text_encoder]
    step_all([(unet + text_encoder, flat)], seed=40)
    assert all(torch.equal(a, b) for a, b in zip(text_encoder, before))
    assert not torch.equal(unet[0], tensors(seed=1)[0])
    assert [g["params"] for g in flat.state_dict()["param_groups"]] == [list(range(8)), [8, 9, 10]]


@pytest.mark.gpu
@needs_gpu
def test_training_on_the_gpu_with_flat_adamw_is_training_with_torchs_adamw_bit_for_bit(comfy_folders, tiny,
                                                                                      monkeypatch):
    """Clipping included (a max_grad_norm small enough to clip every step): its norm is taken tensor by tensor
    as torch's clip_grad_norm_ takes it, its scaling runs on the flat gradient."""
    p = prepared(comfy_folders, tiny)
    _, flat, _ = train(p, 4, learning_rate=1e-2, max_grad_norm=1e-3)
    monkeypatch.setattr(optim, "FlatAdamW", torch.optim.AdamW)
    _, per_tensor, _ = train(p, 4, learning_rate=1e-2, max_grad_norm=1e-3)
    assert flat.history.losses == per_tensor.history.losses
    assert all(torch.equal(flat.weights[k], per_tensor.weights[k]) for k in flat.weights)
    assert flat.optimizer["param_groups"] == per_tensor.optimizer["param_groups"]
    assert all(torch.equal(flat.optimizer["state"][i][k], v) if isinstance(v, torch.Tensor) else
               flat.optimizer["state"][i][k] == v
               for i, entry in per_tensor.optimizer["state"].items() for k, v in entry.items())
