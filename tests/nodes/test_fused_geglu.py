"""SDXL's GEGLU feed-forward trained through the fused Triton kernels computes what ComfyUI's GEGLU computes,
forward and backward, in every training dtype; a training run patches exactly the model's GEGLU layers, only
inside its own MODEL clone, and trains what the eager layers train.

On the CPU the kernels run in Triton's interpreter (the same kernel source the GPU compiles); the GPU run of
the same checks is test_fused_kernels_on_the_gpu_agree_with_comfyuis_geglu (marked gpu)."""
import functools

import pytest
import torch

pytest.importorskip("triton")

from comfy.ldm.modules.attention import GEGLU  # noqa: E402

from eridiffusion.trainers import fused  # noqa: E402

# one rounding of the dtype (relative)
ROUNDING = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def comfy_geglu(dim, inner, dtype, device="cpu"):
    torch.manual_seed(0)
    layer = GEGLU(dim, inner, dtype=torch.float32)     # comfy.ops' Linear: weights set by us, not initialised
    with torch.no_grad():
        layer.proj.weight.copy_(torch.randn(2 * inner, dim) / dim ** 0.5 * 2)
        layer.proj.bias.copy_(torch.randn(2 * inner))
    return layer.to(device=device, dtype=dtype)


def errors_against_exact(dtype, interpret, device="cpu", inner=1300, shape=(2, 37)):
    """Max errors (relative to the largest value) of ComfyUI's eager GEGLU and of the fused one against
    ComfyUI's GEGLU computed in fp64, for the output and for the gradient reaching the projection."""
    layer = comfy_geglu(64, inner, dtype, device)
    x = torch.randn(*shape, 64, device=device, dtype=dtype)
    grad = torch.randn(*shape, inner, device=device, dtype=dtype)
    results = {}
    for name, gate in (("exact", fused.reference_geglu), ("eager", fused.reference_geglu),
                       ("fused", functools.partial(fused.geglu, interpret=interpret))):
        projection = layer.proj(x).detach()
        if name == "exact":
            projection = projection.double()
        projection.requires_grad_()
        out = gate(projection)
        out.backward(grad.to(out.dtype))
        results[name] = (out.double(), projection.grad.double())
    ref_out, ref_grad = results["exact"]
    return {name: ((out - ref_out).abs().max().item() / ref_out.abs().max().item(),
                   (g - ref_grad).abs().max().item() / ref_grad.abs().max().item())
            for name, (out, g) in results.items() if name != "exact"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_geglu_agrees_with_comfyuis_geglu_to_the_dtypes_rounding(dtype):
    # 1300 columns: the kernels' 1024-wide blocks end in a partial one; (2, 37) rows: batch and tokens
    errors = errors_against_exact(dtype, interpret=True)
    fused_out, fused_grad = errors["fused"]
    eager_out, eager_grad = errors["eager"]
    assert fused_out <= ROUNDING[dtype] * 2 and fused_grad <= ROUNDING[dtype] * 4, errors
    if dtype == torch.bfloat16:
        return      # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): the GPU test checks
    # one rounding instead of ComfyUI's two or three: never further from the exact values than eager is
    assert fused_out <= eager_out * 1.01 + 1e-7 and fused_grad <= eager_grad * 1.01 + 1e-7, errors


def test_geglu_runs_comfyuis_own_ops_where_the_kernels_do_not_apply():
    projection = torch.randn(3, 8, 40)
    assert not fused.takes(projection)                           # on the CPU without the interpreter
    assert torch.equal(fused.geglu(projection), fused.reference_geglu(projection))
    strided = torch.randn(3, 80, 8).transpose(1, 2)              # not contiguous
    assert not fused.takes(strided, interpret=True)
    assert torch.equal(fused.geglu(strided, interpret=True), fused.reference_geglu(strided))
    assert not fused.usable_on(torch.device("cpu"))


def test_the_patched_forward_is_the_modules_geglu_with_its_projections_adapter():
    # The forward reaches the projection through the module, so the LoRA that is patched onto `proj` is used.
    layer = comfy_geglu(32, 48, torch.float32)
    x = torch.randn(2, 5, 32)
    patched = fused.FusedGEGLUForward(layer)
    assert torch.equal(patched(x), layer(x))
    layer.proj.forward = lambda t: torch.ones(*t.shape[:-1], 96)     # stands in for the adapter's patch
    assert torch.equal(patched(x), torch.ones(2, 5, 48) * torch.nn.functional.gelu(torch.ones(1)))


def test_training_patches_every_geglu_of_the_model_clone_and_trains_what_eager_trains(comfy_folders, tiny,
                                                                                        monkeypatch):
    from helpers import prepared, settings
    from eridiffusion.trainers import loop
    p = prepared(comfy_folders, tiny, arch="sdxl")
    options = settings(batch_size=2, learning_rate=1e-2, gradient_checkpointing=True)

    def train():
        with torch.inference_mode(False):
            return loop.train(p["model"], p["adapter"], p["latents"], p["captions"], options, 3)

    eager = train()
    geglus = [m for m in p["model"].model.diffusion_model.modules() if type(m) is GEGLU]
    assert geglus
    calls = []
    interpreted = functools.partial(fused.geglu, interpret=True)

    def counted(projection):
        calls.append(fused.takes(projection, interpret=True))
        return interpreted(projection)
    monkeypatch.setattr(fused, "usable_on", lambda device: True)     # as on a GPU with Triton
    monkeypatch.setattr(fused, "geglu", counted)
    patched = train()
    # forward, and its recomputation under checkpointing: every GEGLU of every micro-batch through the kernels
    assert len(calls) >= 2 * 3 * len(geglus) and all(calls)
    assert patched.history.losses == pytest.approx(eager.history.losses, rel=1e-5)
    # AdamW's normalised step turns a 1e-7 difference in a near-zero gradient into up to a few 1e-5 of weight:
    # 1e-4 is 1 % of one step (lr 1e-2), far below what a wrong gradient anywhere would move.
    for key in eager.weights:
        assert torch.allclose(patched.weights[key], eager.weights[key], rtol=1e-4, atol=1e-4), key
    # once the training clone is unloaded, the shared MODEL's layers run ComfyUI's own forward again
    import comfy.model_management
    comfy.model_management.unload_all_models()
    assert all(getattr(m.forward, "__func__", None) is GEGLU.forward for m in geglus)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
                    reason="needs a GPU (ERI_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_kernels_on_the_gpu_agree_with_comfyuis_geglu(dtype):
    assert fused.usable_on(torch.device("cuda"))
    # SDXL's widest: 1280 channels, GEGLU inner 5120, 1024 tokens, batch 2
    errors = errors_against_exact(dtype, interpret=False, device="cuda", inner=5120, shape=(2, 1024))
    fused_out, fused_grad = errors["fused"]
    eager_out, eager_grad = errors["eager"]
    assert fused_out <= ROUNDING[dtype] * 2 and fused_grad <= ROUNDING[dtype] * 4, errors
    assert fused_out <= eager_out * 1.01 + 1e-7 and fused_grad <= eager_grad * 1.01 + 1e-7, errors
