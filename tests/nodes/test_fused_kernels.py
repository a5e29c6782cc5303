"""SDXL trained through the fused Triton kernels (trainers/fused.py) computes what ComfyUI's layers compute:
GEGLU and GroupNorm, forward and backward, in every training dtype, to the dtype's rounding; a training run
patches exactly the model's GEGLU and GroupNorm layers, only inside its own MODEL clone, and trains what the
eager layers train. The DiTs' rotary embedding through the fused kernels is ComfyUI's bit for bit, in every
layout the models call it with, and replaces ComfyUI's only while a micro-batch trains. The Flux single blocks'
GELU (tanh) on its strided slice is PyTorch's bit for bit on the GPU.

On the CPU the kernels run in Triton's interpreter (the same kernel source the GPU compiles); the tests marked
gpu run the same checks on the GPU's compiled kernels, against PyTorch's CUDA kernels."""
import functools
import math

import pytest
import torch

pytest.importorskip("triton")

import comfy.ops  # noqa: E402
from comfy.ldm.modules.attention import GEGLU  # noqa: E402

from eridiffusion.trainers import fused  # noqa: E402

# the CPU tests run the kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
interpreted = pytest.mark.skipif(not fused.INTERPRETING, reason="TRITON_INTERPRET=1 was not set before Triton loaded")

ROUNDING = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}   # relative, one rounding
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
                               reason="needs a GPU (ERI_TEST_DEVICE=cuda)")


def relative_errors(results):
    """Max error relative to the largest exact value, output and input gradient, of each result but 'exact'."""
    ref_out, ref_grad = results.pop("exact")
    return {name: ((out - ref_out).abs().max().item() / ref_out.abs().max().item(),
                   (g - ref_grad).abs().max().item() / ref_grad.abs().max().item())
            for name, (out, g) in results.items()}


def run_each(functions, x, grad):
    """Each function's output and the gradient reaching x; 'exact' runs in fp64."""
    results = {}
    for name, function in functions.items():
        inp = (x.double() if name == "exact" else x.detach().clone()).requires_grad_()
        out = function(inp)
        out.backward(grad.to(out.dtype))
        results[name] = (out.double(), inp.grad.double())
    return relative_errors(results)


# --------------------------------------------------------------------------------------------------- GEGLU
def comfy_geglu(dim, inner, dtype, device="cpu"):
    torch.manual_seed(0)
    layer = GEGLU(dim, inner, dtype=torch.float32)     # comfy.ops' Linear: weights set by us, not initialised
    with torch.no_grad():
        layer.proj.weight.copy_(torch.randn(2 * inner, dim) / dim ** 0.5 * 2)
        layer.proj.bias.copy_(torch.randn(2 * inner))
    return layer.to(device=device, dtype=dtype)


def geglu_errors(dtype, interpret, device="cpu", inner=1300, shape=(2, 37)):
    layer = comfy_geglu(64, inner, dtype, device)
    x = torch.randn(*shape, 64, device=device, dtype=dtype)
    projection = layer.proj(x).detach()
    grad = torch.randn(*shape, inner, device=device, dtype=dtype)
    return run_each({"exact": fused.reference_geglu, "eager": fused.reference_geglu,
                     "fused": functools.partial(fused.geglu, interpret=interpret)}, projection, grad)


def assert_as_close_as_eager(errors, dtype, grad_roundings=4):
    (fused_out, fused_grad), (eager_out, eager_grad) = errors["fused"], errors["eager"]
    assert fused_out <= ROUNDING[dtype] * 2 and fused_grad <= ROUNDING[dtype] * grad_roundings, errors
    assert fused_out <= eager_out * 1.05 + 1e-7 and fused_grad <= eager_grad * 1.05 + 1e-7, errors


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_geglu_agrees_with_comfyuis_geglu_to_the_dtypes_rounding(dtype):
    # 1300 columns: the kernels' 1024-wide blocks end in a partial one; (2, 37) rows: batch and tokens
    errors = geglu_errors(dtype, interpret=True)
    if dtype == torch.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest, the gpu test checks that)
        (out, grad) = errors["fused"]
        assert out <= ROUNDING[dtype] * 2 and grad <= ROUNDING[dtype] * 4, errors
        return
    assert_as_close_as_eager(errors, dtype)   # one rounding instead of ComfyUI's two or three


def test_geglu_runs_comfyuis_own_ops_where_the_kernels_do_not_apply():
    projection = torch.randn(3, 8, 40)
    assert not fused.takes(projection)                           # on the CPU without the interpreter
    assert torch.equal(fused.geglu(projection), fused.reference_geglu(projection))
    strided = torch.randn(3, 80, 8).transpose(1, 2)              # not contiguous
    assert not fused.takes(strided, interpret=True)
    assert torch.equal(fused.geglu(strided, interpret=True), fused.reference_geglu(strided))
    assert not fused.usable_on(torch.device("cpu"))


def test_the_patched_geglu_is_the_modules_own_with_its_projections_adapter():
    # The forward reaches the projection through the module, so the LoRA that is patched onto `proj` is used.
    layer = comfy_geglu(32, 48, torch.float32)
    x = torch.randn(2, 5, 32)
    patched = fused.FusedGEGLUForward(layer)
    assert torch.equal(patched(x), layer(x))
    layer.proj.forward = lambda t: torch.ones(*t.shape[:-1], 96)     # stands in for the adapter's patch
    assert torch.equal(patched(x), torch.ones(2, 5, 48) * torch.nn.functional.gelu(torch.ones(1)))


# ----------------------------------------------------------------------------------------------- GroupNorm
def comfy_group_norm(channels, dtype, device="cpu", cls=comfy.ops.disable_weight_init.GroupNorm):
    torch.manual_seed(1)
    layer = cls(32, channels, eps=1e-6, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels) + 0.5)
        layer.bias.copy_(torch.randn(channels))
    return layer.to(device=device, dtype=dtype).requires_grad_(False)     # base weights are frozen in training


def group_norm_errors(dtype, interpret, device="cpu", shape=(2, 64, 48, 50)):
    layer = comfy_group_norm(shape[1], dtype, device)
    torch.manual_seed(2)
    x = (torch.randn(shape) * 2 + 0.5).to(device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    exact = comfy_group_norm(shape[1], torch.float64, device)
    return run_each({"exact": exact, "eager": layer,
                     "fused": lambda t: fused.group_norm(t, 32, layer.weight, layer.bias, layer.eps, interpret)},
                    x, grad)


@interpreted
@pytest.mark.parametrize("shape", [(2, 64, 48, 50), (1, 64, 7, 9), (3, 96, 5)], ids=["two-blocks", "tiny", "1d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_group_norm_agrees_with_pytorchs_to_the_dtypes_rounding(dtype, shape):
    # 2 x 48 x 50 = 4800 elements a group: one 4096-element block and a partial one
    errors = group_norm_errors(dtype, interpret=True, shape=shape)
    out, grad = errors["fused"]
    # the statistics are rounded to the dtype as PyTorch's CUDA kernel stores them (its CPU kernel keeps fp32)
    assert out <= ROUNDING[dtype] * 4 and grad <= ROUNDING[dtype] * 8, errors


def test_group_norm_runs_pytorchs_kernel_where_the_fused_one_does_not_apply():
    layer = comfy_group_norm(64, torch.float32)
    x = torch.randn(2, 64, 4, 4)
    assert not fused.group_norm_takes(x, 32, layer.weight, layer.bias)           # CPU, no interpreter
    assert not fused.group_norm_takes(x.transpose(2, 3), 32, layer.weight, layer.bias, interpret=True)
    assert not fused.group_norm_takes(x, 32, layer.weight.half(), layer.bias.half(), interpret=True)
    assert not fused.group_norm_takes(x, 32, None, None, interpret=True)
    assert torch.equal(fused.group_norm(x, 32, layer.weight, layer.bias, layer.eps), layer(x))


def test_a_comfy_group_norm_that_casts_or_patches_its_weights_keeps_its_own_forward(monkeypatch):
    x = torch.randn(1, 64, 4, 4)
    calls = []
    monkeypatch.setattr(fused, "group_norm", lambda *a, **k: calls.append(a) or torch.zeros_like(x))
    casting = comfy_group_norm(64, torch.float32, cls=comfy.ops.manual_cast.GroupNorm)
    assert torch.equal(fused.FusedGroupNormForward(casting)(x), casting(x)) and not calls
    patched = comfy_group_norm(64, torch.float32)
    patched.weight_function = [lambda w: w * 2]
    assert torch.equal(fused.FusedGroupNormForward(patched)(x), patched(x)) and not calls
    plain = comfy_group_norm(64, torch.float32)
    fused.FusedGroupNormForward(plain)(x)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------- rotary embedding
def comfy_training_rope1(x, freqs_cis):
    """ComfyUI's apply_rope1 as it runs while a model trains (0.33 branches on its in_training flag)."""
    import comfy.ldm.flux.math as flux_math
    from eridiffusion.trainers.comfy_compat import training_mode
    with training_mode():
        return flux_math.apply_rope1(x, freqs_cis)


def rope_inputs(layout, dtype, device="cpu", batch=2, heads=3, tokens=37, head_dim=32, grid=True):
    """q (as the model hands it to apply_rope1), freqs_cis and an output gradient. `grid`: every value a small
    multiple of 1/4, so that each product and sum is exact in fp32 and the result exact in the dtype; then any
    correct order of operations gives the same bits, as Triton's interpreter (fp32 math in numpy, bf16 by
    truncation) needs to be compared bit for bit."""
    generator = torch.Generator().manual_seed(3)

    def values(*shape, scale=4):
        if grid:
            return torch.randint(-scale * 4, scale * 4 + 1, shape, generator=generator) / 4
        return torch.randn(shape, generator=generator)
    freqs = values(batch if layout != "one-batch-of-freqs" else 1, 1, tokens, head_dim // 2, 2, 2, scale=1)
    if layout == "qwen-image":        # its rotations come in the model's dtype, and ComfyUI computes in it
        freqs = freqs.to(dtype)
    if layout == "lumina":            # Lumina (Z-Image): heads after tokens, freqs moved to match
        x = values(batch, tokens, heads, head_dim)
        freqs = freqs.movedim(1, 2)
    else:                             # Flux, Qwen-Image: q a permuted view of the fused qkv projection
        qkv = values(batch, tokens, 3, heads, head_dim)
        x = qkv.permute(2, 0, 3, 1, 4)[0]
    grad = values(*x.shape)
    return x.to(device=device, dtype=dtype), freqs.to(device), grad.to(device=device, dtype=dtype)


def rope_results(rotate, x, freqs, grad):
    x = x.detach().clone().requires_grad_() if x.is_contiguous() else _strided_leaf(x)
    out = rotate(x, freqs)
    out.backward(grad)
    return out, x.grad


def _strided_leaf(view):
    """A leaf tensor with `view`'s strides (a non-contiguous head as the model's permute gives it)."""
    leaf = torch.empty_strided(view.shape, view.stride(), dtype=view.dtype, device=view.device)
    with torch.no_grad():
        leaf.copy_(view)
    return leaf.requires_grad_()


@interpreted
@pytest.mark.parametrize("layout", ["flux", "lumina", "qwen-image", "one-batch-of-freqs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rope_is_comfyuis_training_rope_bit_for_bit_forward_and_backward(dtype, layout):
    x, freqs, grad = rope_inputs(layout, dtype)
    assert fused.rope_takes(x, freqs, interpret=True)
    out, grad_x = rope_results(functools.partial(fused.rope1, interpret=True), x, freqs, grad)
    comfy_out, comfy_grad_x = rope_results(comfy_training_rope1, x, freqs, grad)
    assert out.dtype == comfy_out.dtype and out.shape == comfy_out.shape
    assert torch.equal(out, comfy_out) and torch.equal(grad_x, comfy_grad_x)
    assert out.abs().max() > 0 and grad_x.abs().max() > 0


def test_rope_is_left_to_comfyui_where_the_kernels_do_not_apply():
    x, freqs, _ = rope_inputs("flux", torch.float32)
    assert not fused.rope_takes(x, freqs)                                   # on the CPU without the interpreter
    assert fused.rope1(x, freqs) is None
    odd, odd_freqs, _ = rope_inputs("flux", torch.float32, head_dim=24)    # not a power of two
    assert not fused.rope_takes(odd, odd_freqs, interpret=True)
    assert not fused.rope_takes(x, freqs.double(), interpret=True)
    assert not fused.rope_takes(x, freqs[:, :, :5], interpret=True)        # does not broadcast to the head
    assert not fused.rope_takes(x, freqs.requires_grad_(), interpret=True)


def test_comfyuis_rotary_embedding_is_replaced_only_inside_the_training_context():
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.qwen_image.model as qwen_image
    from eridiffusion.trainers.comfy_compat import comfy_rope
    original = {(m, name): getattr(m, name) for m, name in ((flux_math, "apply_rope"), (flux_math, "apply_rope1"),
                                                             (lumina, "apply_rope"), (qwen_image, "apply_rope1"))}
    x, freqs, _ = rope_inputs("flux", torch.float32)
    rotated = []

    def rotate(t, f):
        rotated.append(t.shape)
        return None if t.shape[-1] == 24 else torch.full_like(t, 7.0)
    with comfy_rope(rotate):
        assert all(getattr(m, name) is not function for (m, name), function in original.items())
        q, k = flux_math.apply_rope(x, x, freqs)               # what Flux's attention calls
        assert torch.equal(q, torch.full_like(x, 7.0)) and torch.equal(k, q)
        assert torch.equal(qwen_image.apply_rope1(x, freqs), q)
        odd, odd_freqs, _ = rope_inputs("flux", torch.float32, head_dim=24)
        assert torch.equal(flux_math.apply_rope1(odd, odd_freqs), original[(flux_math, "apply_rope1")](odd, odd_freqs))
    assert len(rotated) == 4
    assert all(getattr(m, name) is function for (m, name), function in original.items())
    with pytest.raises(ZeroDivisionError), comfy_rope(rotate):
        1 / 0
    assert all(getattr(m, name) is function for (m, name), function in original.items())


@pytest.mark.slow      # ~20 s: two trainings of a tiny Flux, one through Triton's interpreter
@interpreted
def test_training_a_flux_model_rotates_through_the_fused_kernels_and_trains_what_eager_trains(
        comfy_folders, tiny, monkeypatch):
    from helpers import prepared, settings
    from eridiffusion.trainers import loop
    p = prepared(comfy_folders, tiny, arch="flux")
    options = settings(batch_size=2, learning_rate=1e-2, gradient_checkpointing=True)

    def train():
        with torch.inference_mode(False):
            return loop.train(p["model"], p["adapter"], p["latents"], p["captions"], options, 2)

    eager = train()
    rope1, taken = fused.rope1, []

    def counted_rope1(x, freqs_cis):
        taken.append(fused.rope_takes(x, freqs_cis, interpret=True))
        return rope1(x, freqs_cis, interpret=True)
    gelu_tanh, gelus = fused.gelu_tanh, []

    def counted_gelu_tanh(x):
        gelus.append(fused.gelu_tanh_takes(x, interpret=True))
        return gelu_tanh(x, interpret=True)
    rms_norm_takes, rms_norm, norms = fused.rms_norm_takes, fused.rms_norm, []

    def counted_rms_norm(x, weight, eps):
        norms.append(rms_norm_takes(x, weight.to(x.dtype), interpret=True))
        return rms_norm(x, weight, eps, interpret=True)
    joint_inputs, single_inputs, cat_gelu_tanh, joined = fused.joint_attention_inputs, fused.single_block_inputs, \
        fused.cat_gelu_tanh, []

    def counted_joint_inputs(*args):
        outputs = joint_inputs(*args, interpret=True)
        joined.append(("joint", outputs[0].grad_fn.name()))
        return outputs

    def counted_single_inputs(*args):
        outputs = single_inputs(*args, interpret=True)
        joined.append(("single", outputs[-1] is not None))
        return outputs

    def counted_cat_gelu_tanh(left, x, gelu, gradient):
        joined.append(("gelu", gradient is not None))
        return cat_gelu_tanh(left, x, gelu, gradient, interpret=True)
    monkeypatch.setattr(fused, "usable_on", lambda device: True)     # as on a GPU with Triton
    monkeypatch.setattr(fused, "rope1", counted_rope1)
    monkeypatch.setattr(fused, "gelu_tanh", counted_gelu_tanh)
    monkeypatch.setattr(fused, "rms_norm_takes", lambda x, weight, interpret=False: rms_norm_takes(x, weight, True))
    monkeypatch.setattr(fused, "rms_norm", counted_rms_norm)
    monkeypatch.setattr(fused, "joint_attention_inputs", counted_joint_inputs)
    monkeypatch.setattr(fused, "single_block_inputs", counted_single_inputs)
    monkeypatch.setattr(fused, "cat_gelu_tanh", counted_cat_gelu_tanh)
    patched = train()
    diffusion_model = p["model"].model.diffusion_model
    doubles, singles = len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)
    # q and k of every block, in forward and in its recomputation, for each of the two steps
    assert len(taken) >= 2 * 2 * 2 * (doubles + singles) and all(taken)
    # every block's q, k and v through the kernels that write them (and their projection's gradient) in one
    # piece (trainers/arch/flux.py), likewise, and the single blocks' GELU on its strided slice straight into its
    # concatenation with the attention output; the double blocks' GELU (contiguous) stays torch's
    assert joined.count(("joint", "_JointAttentionInputsBackward")) == 2 * 2 * doubles
    assert joined.count(("single", True)) == joined.count(("gelu", True)) == 2 * 2 * singles
    assert len(joined) == 2 * 2 * (doubles + 2 * singles)
    assert gelus.count(True) == 0 and gelus.count(False) == 2 * 2 * 2 * doubles
    assert not norms        # (no QK norm left to the module's forward)
    # the interpreter rounds fp32 -> bf16 by truncation where the GPU rounds to nearest: close, not equal, here
    assert patched.history.losses == pytest.approx(eager.history.losses, rel=1e-3)
    import comfy.ldm.flux.math as flux_math
    assert flux_math.apply_rope1.__module__ == "comfy.ldm.flux.math"
    import comfy.model_management
    comfy.model_management.unload_all_models()
    assert all(getattr(block.mlp_act.forward, "__func__", None) is torch.nn.GELU.forward
               for block in diffusion_model.single_blocks)
    assert all(getattr(block.norm.query_norm.forward, "__func__", None) is type(block.norm.query_norm).forward
               for block in diffusion_model.single_blocks)


# -------------------------------------------------------------------------------------------- GELU (tanh)
def single_block_mlp_slice(dtype, device="cpu", tokens=37, hidden=16, mlp=48, values=None):
    """The Flux single block's MLP input: the last `mlp` columns of its fused projection's output (a strided
    slice), as ComfyUI's `torch.split(linear1(...), [3 * hidden, mlp], dim=-1)` gives it."""
    torch.manual_seed(0)
    projection = torch.randn(1, tokens, 3 * hidden + mlp, device=device, dtype=torch.float32) * 3
    if values is not None:      # every value of the dtype, laid into the slice row by row
        rows = math.ceil(values.numel() / mlp)
        projection = torch.zeros(1, rows, 3 * hidden + mlp, device=device)
        laid = torch.zeros(rows * mlp, device=device)
        laid[:values.numel()] = values.float()
        projection[0, :, 3 * hidden:] = laid.view(rows, mlp)
    return torch.split(projection.to(dtype), [3 * hidden, mlp], dim=-1)[1]


def gelu_results(gelu, x, grad):
    x = _strided_leaf(x)
    out = gelu(x)
    out.backward(grad)
    return out, x.grad


def torch_gelu_tanh(x):
    return torch.nn.GELU(approximate="tanh")(x)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_gelu_tanh_on_a_strided_slice_agrees_with_pytorchs_to_the_dtypes_rounding(dtype):
    x = single_block_mlp_slice(dtype)
    assert not x.is_contiguous() and fused.gelu_tanh_takes(x, interpret=True)
    grad = torch.randn(x.shape, dtype=dtype)
    assert_as_close_as_eager(run_each({"exact": torch_gelu_tanh, "eager": torch_gelu_tanh,
                                       "fused": functools.partial(fused.gelu_tanh, interpret=True)}, x, grad),
                             dtype)
    # a gradient that arrives as a strided slice too (the concatenation's backward hands out such views)
    wide_grad = torch.randn(*x.shape[:-1], x.shape[-1] + 8, dtype=dtype)[..., 8:]
    out, grad_x = gelu_results(functools.partial(fused.gelu_tanh, interpret=True), x, wide_grad)
    eager_out, eager_grad_x = gelu_results(torch_gelu_tanh, x, wide_grad.contiguous())
    assert out.shape == x.shape and out.dtype == dtype and grad_x.shape == x.shape
    error = (grad_x.double() - eager_grad_x.double()).abs().max() / eager_grad_x.double().abs().max()
    assert error <= ROUNDING[dtype] * 8


def test_gelu_tanh_is_left_to_pytorch_where_the_kernels_do_not_apply():
    x = single_block_mlp_slice(torch.float32)
    assert not fused.gelu_tanh_takes(x)                                     # on the CPU without the interpreter
    assert torch.equal(fused.gelu_tanh(x), torch_gelu_tanh(x))
    assert not fused.gelu_tanh_takes(x.contiguous(), interpret=True)        # torch's vectorized kernel is as fast
    assert not fused.gelu_tanh_takes(x.transpose(1, 2), interpret=True)     # columns not adjacent
    assert not fused.gelu_tanh_takes(x.double(), interpret=True)
    assert fused.is_gelu_tanh(torch.nn.GELU(approximate="tanh"))
    assert not fused.is_gelu_tanh(torch.nn.GELU()) and not fused.is_gelu_tanh(torch.nn.SiLU())


# ------------------------------------------------------------------------------------------------ RMSNorm
def qk_of_projection(layout, dtype, device="cpu", batch=2, tokens=37, heads=3, head_dim=128, scales=(1.0,)):
    """q of a fused qkv projection's output, a strided view as the model hands it to its q norm: Flux permutes it
    to (batch, heads, tokens, head_dim), SD 3.5 (MMDiT's split_qkv) leaves it (batch, tokens, heads, head_dim).
    `scales`: the rows' magnitudes cycle through them (tiny ones make eps matter)."""
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=generator)
    rows = qkv.view(batch, tokens, 3, heads, head_dim)
    magnitudes = torch.tensor(scales).repeat(math.ceil(batch * tokens * heads / len(scales)))
    rows *= magnitudes[:batch * tokens * heads].view(batch, tokens, 1, heads, 1)
    qkv = qkv.to(device=device, dtype=dtype)
    if layout == "flux":
        return qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[0]
    return qkv.reshape(batch, tokens, 3, heads, head_dim).movedim(2, 0)[0]


def rms_weight(head_dim, dtype, device="cpu"):
    return (1 + torch.randn(head_dim, generator=torch.Generator().manual_seed(6)) / 4).to(device=device,
                                                                                          dtype=dtype)


def rms_results(norm, x, grad):
    x = _strided_leaf(x)
    out = norm(x)
    out.backward(grad)
    return out, x.grad


@interpreted
@pytest.mark.parametrize("layout, head_dim", [("flux", 128), ("sd3", 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rms_norm_of_a_strided_q_agrees_with_pytorchs_to_the_dtypes_rounding(dtype, layout, head_dim):
    x = qk_of_projection(layout, dtype, head_dim=head_dim)
    weight = rms_weight(head_dim, dtype)
    assert not x.is_contiguous() and fused.rms_norm_takes(x, weight, interpret=True)
    grad = torch.randn(x.shape, dtype=dtype)

    def torch_rms_norm(inp):
        return torch.nn.functional.rms_norm(inp, (head_dim,), weight.to(inp.dtype), 1e-6)
    errors = run_each({"exact": torch_rms_norm, "eager": torch_rms_norm,
                       "fused": lambda inp: fused.rms_norm(inp, weight, 1e-6, interpret=True)}, x, grad)
    if dtype == torch.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest, the gpu test checks that)
        (out, grad) = errors["fused"]
        assert out <= ROUNDING[dtype] * 2 and grad <= ROUNDING[dtype] * 4, errors
    else:
        assert_as_close_as_eager(errors, dtype)
    out = fused.rms_norm(x, weight, 1e-6, interpret=True)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()


def test_rms_norm_is_left_to_pytorch_where_the_kernels_do_not_apply():
    x = qk_of_projection("flux", torch.float32)
    weight = rms_weight(128, torch.float32)
    assert not fused.rms_norm_takes(x, weight)                                   # the CPU without the interpreter
    assert torch.equal(fused.rms_norm(x, weight, 1e-6), torch.nn.functional.rms_norm(x, (128,), weight, 1e-6))
    assert not fused.rms_norm_takes(x.contiguous(), weight, interpret=True)      # no copy to save
    assert not fused.rms_norm_takes(x, None, interpret=True)
    assert not fused.rms_norm_takes(x, weight.clone().requires_grad_(), interpret=True)   # a weight that trains
    assert not fused.rms_norm_takes(x.double(), weight.double(), interpret=True)
    wide = qk_of_projection("flux", torch.float32, head_dim=256)
    assert not fused.rms_norm_takes(wide, rms_weight(256, torch.float32), interpret=True)     # rows past 128


def test_the_q_and_k_norms_of_comfyuis_models_are_read_as_their_forward_reads_them(tiny):
    """Flux's QK norms (0.3.75's own RMSNorm, 0.33's comfy.ops one with torch's default eps), SD 3.5's (MMDiT's
    RMSNorm, qk_norm "rms") and Z-Image's (comfy.ops' RMSNorm on both versions): the weight and eps the fused
    forward takes give the module's own output, and the architecture patches each of them."""
    import comfy.supported_models
    from eridiffusion.trainers.comfy_compat import rms_norm_parameters
    from eridiffusion.trainers.arch import flux, sd3, z_image
    sd35 = comfy.supported_models.SD3(dict(tiny.SD3_MMDIT, qk_norm="rms")).get_model({}, "").diffusion_model
    for arch, model, layout, names in (
            (flux.Flux(), tiny.tiny_model("flux").model.diffusion_model, "flux", ("query_norm", "key_norm")),
            (sd3.SD3(), sd35, "sd3", ("ln_q", "ln_k")),
            (z_image.ZImage(), tiny.tiny_model("zimage").model.diffusion_model, "sd3", ("q_norm", "k_norm"))):
        norms = {path: module for path, module in model.named_modules() if path.rpartition(".")[2] in names}
        assert norms and all(rms_norm_parameters(module) is not None for module in norms.values())
        for module in norms.values():
            weight, eps = rms_norm_parameters(module)
            x = qk_of_projection(layout, torch.float32, heads=2, head_dim=weight.shape[0], scales=(1.0, 1e-4))
            with torch.no_grad():
                weight.copy_(rms_weight(weight.shape[0], weight.dtype))
            assert torch.equal(torch.nn.functional.rms_norm(x, weight.shape, weight, eps), module(x))
        assert set(arch.fused_forwards(model)) >= set(norms)
    assert rms_norm_parameters(torch.nn.LayerNorm(8)) is None


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.slow      # ~30 s: Triton's interpreter runs each kernel's programs one by one in Python
@interpreted
def test_training_patches_every_geglu_and_group_norm_of_the_model_clone_and_trains_what_eager_trains(
        comfy_folders, tiny, monkeypatch):
    from helpers import prepared, settings
    from eridiffusion.trainers import loop
    p = prepared(comfy_folders, tiny, arch="sdxl")
    options = settings(batch_size=2, learning_rate=1e-2, gradient_checkpointing=True)

    def train():
        with torch.inference_mode(False):
            return loop.train(p["model"], p["adapter"], p["latents"], p["captions"], options, 2)

    eager = train()
    modules = list(p["model"].model.diffusion_model.modules())
    geglus = [m for m in modules if type(m) is GEGLU]
    group_norms = [m for m in modules if isinstance(m, torch.nn.GroupNorm)]
    assert geglus and group_norms
    calls = {"geglu": [], "group_norm": []}
    geglu, group_norm = fused.geglu, fused.group_norm

    def counted_geglu(projection):
        calls["geglu"].append(fused.takes(projection, interpret=True))
        return geglu(projection, interpret=True)

    def counted_group_norm(x, groups, weight, bias, eps):
        calls["group_norm"].append(fused.group_norm_takes(x, groups, weight, bias, interpret=True))
        return group_norm(x, groups, weight, bias, eps, interpret=True)
    monkeypatch.setattr(fused, "usable_on", lambda device: True)     # as on a GPU with Triton
    monkeypatch.setattr(fused, "geglu", counted_geglu)
    monkeypatch.setattr(fused, "group_norm", counted_group_norm)
    patched = train()
    # forward, and its recomputation under checkpointing: every layer of every micro-batch through the kernels
    assert len(calls["geglu"]) >= 2 * 2 * len(geglus) and all(calls["geglu"])
    assert len(calls["group_norm"]) >= 2 * len(group_norms) and all(calls["group_norm"])
    assert patched.history.losses == pytest.approx(eager.history.losses, rel=1e-5)
    # AdamW's normalised step turns a 1e-7 difference in a near-zero gradient into up to a few 1e-5 of weight:
    # 1e-4 is 1 % of one step (lr 1e-2), far below what a wrong gradient anywhere would move.
    for key in eager.weights:
        assert torch.allclose(patched.weights[key], eager.weights[key], rtol=1e-4, atol=1e-4), key
    # once the training clone is unloaded, the shared MODEL's layers run their own forward again
    import comfy.model_management
    comfy.model_management.unload_all_models()
    assert all(getattr(m.forward, "__func__", None) is GEGLU.forward for m in geglus)
    assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in group_norms)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_kernels_on_the_gpu_agree_with_comfyuis_layers(dtype):
    assert fused.usable_on(torch.device("cuda"))
    # SDXL's widest GEGLU: 1280 channels, inner 5120, 1024 tokens, batch 2; its largest GroupNorm: 320 x 128²
    assert_as_close_as_eager(geglu_errors(dtype, interpret=False, device="cuda", inner=5120, shape=(2, 1024)), dtype)
    assert_as_close_as_eager(group_norm_errors(dtype, interpret=False, device="cuda", shape=(1, 320, 128, 128)),
                             dtype, grad_roundings=8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["flux", "lumina", "qwen-image"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rope_on_the_gpu_is_comfyuis_bit_for_bit(dtype, layout):
    assert fused.usable_on(torch.device("cuda"))
    # Flux-dev at 1024²: 24 heads of 128 over 4,096 image and 512 text tokens; random values, real rotations
    x, freqs, grad = rope_inputs(layout, dtype, device="cuda", batch=1, heads=24, tokens=4608, head_dim=128,
                                 grid=False)
    from comfy.ldm.flux.layers import EmbedND
    ids = torch.randint(0, 64, (1, 4608, 3), device="cuda").float()
    freqs = EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])(ids)
    if layout == "qwen-image":
        freqs = freqs.to(dtype).contiguous()
    if layout == "lumina":
        freqs = freqs.movedim(1, 2)
    assert fused.rope_takes(x, freqs)
    out, grad_x = rope_results(fused.rope1, x, freqs, grad)
    comfy_out, comfy_grad_x = rope_results(comfy_training_rope1, x, freqs, grad)
    assert torch.equal(out, comfy_out), (out.float() - comfy_out.float()).abs().max()
    assert torch.equal(grad_x, comfy_grad_x), (grad_x.float() - comfy_grad_x.float()).abs().max()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_gelu_tanh_on_the_gpu_is_pytorchs_bit_for_bit(dtype):
    assert fused.usable_on(torch.device("cuda"))
    if dtype == torch.float32:      # Flux-dev's single block at 1024²: 4,608 tokens, hidden 3,072, MLP 12,288
        x = single_block_mlp_slice(dtype, "cuda", tokens=4608, hidden=3072, mlp=12288)
    else:                           # every finite value of the 16-bit dtype
        bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32, device="cuda").to(torch.int16)
        values = bits.view(dtype)
        values = values[torch.isfinite(values)]
        x = single_block_mlp_slice(dtype, "cuda", hidden=64, mlp=512, values=values)
    assert fused.gelu_tanh_takes(x)
    for scale in (1.0, 1e-3, 300.0):
        grad = (torch.randn(x.shape, device="cuda") * scale).to(dtype)
        out, grad_x = gelu_results(fused.gelu_tanh, x, grad)
        torch_out, torch_grad_x = gelu_results(torch_gelu_tanh, x, grad)
        # (bf16 inputs beyond 2^64 overflow x² to inf, and 0·inf gives NaN gradients in both)
        torch.testing.assert_close(out, torch_out, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(grad_x, torch_grad_x, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout, head_dim", [("flux", 128), ("sd3", 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rms_norm_on_the_gpu_is_pytorchs_bit_for_bit(dtype, layout, head_dim):
    """Flux-dev's q at 1024² (24 heads of 128 over 4,608 tokens) and SD 3.5 Large's layout (heads of 64), rows of
    magnitudes from 1e-5 (where eps dominates) to 30, both epsilons ComfyUI's norms pass; gradients contiguous
    and as a strided slice (the concatenation's backward hands out such views)."""
    assert fused.usable_on(torch.device("cuda"))
    x = qk_of_projection(layout, dtype, "cuda", batch=1, tokens=4608, heads=24, head_dim=head_dim,
                         scales=(1.0, 1e-3, 30.0, 1e-5))
    weight = rms_weight(head_dim, dtype, "cuda")
    assert fused.rms_norm_takes(x, weight)
    generator = torch.Generator(device="cuda").manual_seed(7)
    for eps in (1e-6, torch.finfo(torch.float32).eps):
        for grad in (torch.randn(x.shape, device="cuda", generator=generator).to(dtype),
                     torch.randn(*x.shape[:-2], x.shape[-2] + 512, head_dim, device="cuda",
                                 generator=generator).to(dtype)[..., 512:, :]):
            out, grad_x = rms_results(lambda inp: fused.rms_norm(inp, weight, eps), x, grad)
            torch_out, torch_grad_x = rms_results(
                lambda inp: torch.nn.functional.rms_norm(inp, (head_dim,), weight, eps), x, grad)
            torch.testing.assert_close(out, torch_out, rtol=0, atol=0)
            torch.testing.assert_close(grad_x, torch_grad_x, rtol=0, atol=0)


# ------------------------------------------------------------------------------- copy where a device flag is set
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreted),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
@pytest.mark.parametrize("dtype, size", [(torch.float32, 3 * 4096 * 4 + 5), (torch.uint8, 1027),
                                         (torch.uint8, 4096), (torch.bfloat16, 5)], ids=str)
def test_copy_if_flagged_copies_bit_for_bit_where_the_device_flag_is_set_and_nothing_where_it_is_clear(
        device, dtype, size):
    # The flat AdamW8bit keeps its weights and state this way before a step the device may skip (trainers/optim.py)
    if dtype == torch.uint8:
        src = torch.randint(1, 256, (size,), dtype=dtype, device=device)
    else:
        src = torch.randn(size, device=device).to(dtype)
        src[0] = float("nan")       # copied as bits, NaN too
    assert fused.flag_copy_takes(src, interpret=True)
    for flag in (0.0, 1.0, float("nan")):
        dst = torch.zeros_like(src)
        fused.copy_if_flagged(torch.tensor([flag], device=device), src, dst, interpret=True)
        if flag == 0:
            assert torch.count_nonzero(dst) == 0, flag
        else:
            assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8)), flag
