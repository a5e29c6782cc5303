"""Gradient checkpointing on the GPU trains what training without it trains, on every architecture, with each
block's attention kept or recomputed, its Linear layers' outputs kept, with and without CUDA graphs.

SDXL's and Flux's images are 1024 pixels so that ComfyUI's attention takes its GPU path: ComfyUI 0.33 hands
attention inputs of 131,072 elements and more to SDPA under its own backend priority (flash, cuDNN, efficient,
math), and that path broke checkpointed training there on full-size models ("cuDNN Frontend error: The dim
for input_names::Stats is invalid", "_scaled_dot_product_flash_attention encountered during backward, but
not found in storage"). The tiny SD3's position table stops at 256 pixels, below that path; bench/ runs the
full-size SD 3.5 Large. Bit-exact equality is not expected in bf16 (the recomputation's kernels may round
differently, and Adam turns a near-zero gradient's sign into a whole step): the losses agree to 0.1 % and
the weights' change from the start to 10 % of its norm. In a new process the first checkpointed test runs the
first attention calls (trainers/blocks.py: prime_attention). These need a GPU:
`ERI_TEST_DEVICE=cuda scripts/test -m gpu`; on the CPU they are skipped."""
import pytest
import torch

from helpers import prepared, settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
    reason="needs a GPU (ERI_TEST_DEVICE=cuda)")]

SIDE = {"sdxl": 1024, "sd3": 256, "flux": 1024, "zimage": 1024}
OPTIONS = dict(precision="bf16", learning_rate=1e-3)


def train(p, steps, **overrides):
    from eridiffusion.trainers.loop import train as train_steps
    with torch.inference_mode(False):
        return train_steps(p["model"], p["adapter"], p["latents"], p["captions"],
                           settings(**{**OPTIONS, **overrides}), steps)


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux", "zimage"])
def arch(request):
    return request.param


@pytest.fixture
def p(comfy_folders, tiny, arch):
    side = SIDE[arch]
    return prepared(comfy_folders, tiny, arch=arch, sizes=((side, side),) * 2, resolution=side, min_side=64,
                    max_side=side)


@pytest.mark.parametrize("compile_mode", ["off", "cuda_graphs"])
@pytest.mark.parametrize("kept", [{}, {"recompute_attention": True}, {"recompute_layers": False}],
                         ids=["attention_kept", "attention_recomputed", "layers_kept"])
def test_checkpointed_training_equals_training_without_checkpointing(p, compile_mode, kept):
    # checkpointed first: in a new process the first attention calls are the ones that failed
    checkpointed = train(p, 3, gradient_checkpointing=True, compile=compile_mode, **kept)
    plain = train(p, 3, gradient_checkpointing=False, compile=compile_mode)
    assert checkpointed.history.losses == pytest.approx(plain.history.losses, rel=1e-3)
    start = p["adapter"].weights
    change = torch.cat([(plain.weights[k] - start[k]).flatten() for k in start])
    difference = torch.cat([(checkpointed.weights[k] - plain.weights[k]).flatten() for k in start])
    assert change.norm() > 0 and difference.norm() <= 0.1 * change.norm()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="cuDNN's attention is training's first choice on Hopper and later")
def test_training_attention_runs_cudnns_kernels_through_comfyuis_attention_on_hopper():
    """ComfyUI 0.33 calls SDPA under its own backend order (flash first), measured 9-13 % slower for a training
    step on an H200 than cuDNN's attention, torch's choice there. Inside a training micro-batch's context
    ComfyUI's attention runs cuDNN's kernels, forward and backward, and ComfyUI's order is back afterwards."""
    import comfy.ops
    from torch.profiler import ProfilerActivity, profile
    from eridiffusion.trainers.blocks import training_attention
    comfy_order = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    sdpa = getattr(comfy.ops, "scaled_dot_product_attention", torch.nn.functional.scaled_dot_product_attention)
    # Flux's attention at 1024 px, a tenth of its heads: past the 131,072 elements from which 0.33 sets its order
    q, k, v = (torch.randn((1, 4, 4608, 128), device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.enable_grad(), training_attention(torch.device("cuda")):
            sdpa(q, k, v).sum().backward()
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not any("pytorch_flash" in name for name in kernels), kernels
    assert any("cudnn" in name.lower() or "sdpa" in name.lower() for name in kernels), kernels
    assert getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None) is comfy_order


@pytest.mark.parametrize("gradient_checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_sd3_blocks_on_a_contiguous_stream_train_bit_for_bit_as_on_comfyuis_layout(comfy_folders, tiny, monkeypatch,
                                                                                   gradient_checkpointing):
    """Architecture.contiguous_block_inputs moves data only: with CUDA graphs, the Triton kernels and bf16, the
    losses and weights are those of the blocks run on MMDiT's transposed x. SDPA's math backend: the fused
    backends' backward is not deterministic from run to run."""
    from torch.nn.attention import SDPBackend

    from eridiffusion.trainers import blocks
    from eridiffusion.trainers.arch.sd3 import SD3
    monkeypatch.setattr(blocks, "TRAINING_SDPA_PRIORITY", [SDPBackend.MATH])
    side = SIDE["sd3"]
    p = prepared(comfy_folders, tiny, arch="sd3", sizes=((side, side),) * 2, resolution=side, min_side=64,
                 max_side=side)
    options = dict(gradient_checkpointing=gradient_checkpointing, compile="cuda_graphs")
    contiguous = train(p, 3, **options)
    monkeypatch.setattr(SD3, "contiguous_block_inputs", False)
    comfys_layout = train(p, 3, **options)
    assert contiguous.history.losses == comfys_layout.history.losses
    assert all(torch.equal(contiguous.weights[k], comfys_layout.weights[k]) for k in contiguous.weights)
