"""Gradient checkpointing on the GPU trains what training without it trains, on every architecture, with each
block's attention kept or recomputed, with and without CUDA graphs.

The images are 1024 pixels so that ComfyUI's attention takes its GPU path: ComfyUI 0.33 hands attention
inputs of 131,072 elements and more to SDPA under its own backend priority (flash, cuDNN, efficient, math),
and that path broke checkpointed training there ("Trying to backward an extra time ... selective activation
checkpoint", "cuDNN Frontend error", "_scaled_dot_product_flash_attention encountered during backward, but not
found in storage"). These need a GPU: `ERI_TEST_DEVICE=cuda scripts/test -m gpu`; on the CPU they are skipped."""
import pytest
import torch

from helpers import prepared, settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
    reason="needs a GPU (ERI_TEST_DEVICE=cuda)")]

SIZES = ((1024, 1024),) * 2
DATASET = dict(resolution=1024, min_side=64, max_side=1024)
OPTIONS = dict(precision="bf16", learning_rate=1e-3)


def train(p, steps, **overrides):
    from eridiffusion.trainers.loop import train as train_steps
    with torch.inference_mode(False):
        return train_steps(p["model"], p["adapter"], p["latents"], p["captions"],
                           settings(**{**OPTIONS, **overrides}), steps)


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def arch(request):
    return request.param


@pytest.fixture
def p(comfy_folders, tiny, arch):
    return prepared(comfy_folders, tiny, arch=arch, sizes=SIZES, **DATASET)


@pytest.mark.parametrize("compile_mode", ["off", "cuda_graphs"])
@pytest.mark.parametrize("recompute_attention", [False, True], ids=["attention_kept", "attention_recomputed"])
def test_checkpointed_training_equals_training_without_checkpointing(p, compile_mode, recompute_attention):
    plain = train(p, 3, gradient_checkpointing=False, compile=compile_mode)
    checkpointed = train(p, 3, gradient_checkpointing=True, recompute_attention=recompute_attention,
                         compile=compile_mode)
    assert checkpointed.history.losses == pytest.approx(plain.history.losses, rel=1e-3)
    for key in plain.weights:
        assert torch.allclose(checkpointed.weights[key], plain.weights[key], rtol=1e-3, atol=1e-5), key
