"""The Flux family's blocks while training, their concatenations fused (trainers/fused.py, trainers/arch/flux.py):
a double block's text and image q and k are normalised straight into their concatenation, and a single block's
MLP activation is written straight beside its attention output. The results are ComfyUI's bit for bit: the
training forwards reproduce ComfyUI's block forwards (0.3.75's and 0.33's, checked by their source), and the
kernels writing into a concatenation write what the concatenation of their separate outputs holds.

On the CPU the kernels run in Triton's interpreter; the GPU tests compare against torch's CUDA kernels."""
import pytest
import torch

pytest.importorskip("triton")

from eridiffusion.trainers import fused  # noqa: E402
from eridiffusion.trainers.arch import flux as flux_arch  # noqa: E402
from eridiffusion.trainers.blocks import TrainingBlockForward  # noqa: E402

interpreted = pytest.mark.skipif(not fused.INTERPRETING, reason="TRITON_INTERPRET=1 was not set before Triton loaded")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
                               reason="needs a GPU (ERI_TEST_DEVICE=cuda)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qk_views(batch, tokens, heads, head_dim, dtype, device, seed):
    """q and k of a Flux qkv projection's output: strided views (batch, heads, tokens, head_dim), leaves."""
    generator = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, tokens, 3 * heads * head_dim, generator=generator) * 2).to(device=device, dtype=dtype)
    qkv.requires_grad_()
    q, k, _ = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    return qkv, q, k


def rms_norm_module(head_dim, dtype, device, seed):
    norm = torch.nn.RMSNorm(head_dim, eps=1e-6, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(head_dim, generator=torch.Generator().manual_seed(seed)) / 4)
    return norm.requires_grad_(False)


def norms_into_concatenation(dtype, device, interpret, text=7, image=33, heads=2, head_dim=128):
    """q of text and image normalised into their concatenation, by rms_norm_cat and by the fused norm of each
    part concatenated by torch: (outputs, both projections' gradients) of each."""
    norms = (rms_norm_module(head_dim, dtype, device, 1), rms_norm_module(head_dim, dtype, device, 2))
    grad = torch.randn(1, heads, text + image, head_dim, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    results = []
    for joined in (True, False):
        txt_qkv, txt_q, _ = qk_views(1, text, heads, head_dim, dtype, device, 4)
        img_qkv, img_q, _ = qk_views(1, image, heads, head_dim, dtype, device, 5)
        if joined:
            out = fused.rms_norm_cat(norms, (txt_q, img_q), 2, like=img_q, interpret=interpret)
        else:
            out = torch.cat([fused.rms_norm(x, norm.weight, norm.eps, interpret=interpret)
                             for x, norm in zip((txt_q, img_q), norms)], 2)
        out.backward(grad)
        results.append((out, txt_qkv.grad, img_qkv.grad))
    return results


def gelu_beside_attention(dtype, device, interpret, tokens=37, hidden=32, mlp=4 * 32 + 16):
    """A single block's attention output beside its MLP activation, by cat_gelu_tanh and by torch.cat of the fused
    GELU: (output, projection's gradient, attention's gradient) of each."""
    grad = torch.randn(1, tokens, hidden + mlp, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    gelu = torch.nn.GELU(approximate="tanh")
    results = []
    for joined in (True, False):
        generator = torch.Generator().manual_seed(8)
        projection = (torch.randn(1, tokens, 3 * hidden + mlp, generator=generator) * 3).to(device, dtype)
        attention = torch.randn(1, tokens, hidden, generator=generator).to(device, dtype).requires_grad_()
        projection.requires_grad_()
        x = torch.split(projection, [3 * hidden, mlp], dim=-1)[1]
        if joined:
            out = fused.cat_gelu_tanh(attention, x, gelu, interpret=interpret)
        else:
            out = torch.cat((attention, fused.gelu_tanh(x, interpret=interpret)), -1)
        out.backward(grad)
        results.append((out, projection.grad, attention.grad))
    return results


def assert_same_bits(results):
    joined, separate = results
    for a, b in zip(joined, separate):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_normalised_into_its_concatenation_is_the_concatenation_of_the_normalised_parts(dtype, monkeypatch):
    taken = []
    _FusedRMSNormCat = fused._FusedRMSNormCat

    class Counted(_FusedRMSNormCat):
        @staticmethod
        def forward(ctx, *args):
            taken.append(True)
            return _FusedRMSNormCat.forward(ctx, *args)
    monkeypatch.setattr(fused, "_FusedRMSNormCat", Counted)
    assert_same_bits(norms_into_concatenation(dtype, "cpu", interpret=True))
    assert taken == [True]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_written_beside_the_attention_output_is_their_concatenation(dtype):
    results = gelu_beside_attention(dtype, "cpu", interpret=True)
    assert_same_bits(results)
    assert results[0][0].is_contiguous()


def test_the_concatenations_are_torchs_where_the_kernels_do_not_apply():
    # the CPU without the interpreter: the modules run and torch concatenates, the same results
    assert_same_bits(norms_into_concatenation(torch.float32, "cpu", interpret=False))
    assert_same_bits(gelu_beside_attention(torch.float32, "cpu", interpret=False))
    norms = (rms_norm_module(128, torch.float32, "cpu", 1), rms_norm_module(128, torch.float32, "cpu", 2))
    _, txt_q, _ = qk_views(1, 7, 2, 128, torch.float32, "cpu", 4)
    _, img_q, _ = qk_views(1, 9, 2, 128, torch.float32, "cpu", 5)
    # another dtype for v (QKNorm casts q and k to it): torch's path, cast as ComfyUI casts
    out = fused.rms_norm_cat(norms, (txt_q, img_q), 2, like=img_q.double(), interpret=True)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.cat((norms[0](txt_q).double(), norms[1](img_q).double()), 2))


# ------------------------------------------------------------------------------------------- block forwards
def flux_blocks(tiny, arch="flux"):
    model = tiny.tiny_model(arch).model.diffusion_model
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model


def block_inputs(model, tokens=16, text=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = model.hidden_size
    ids = torch.zeros(1, text + tokens, 3)
    ids[0, text:, 1] = torch.arange(tokens) // 4
    ids[0, text:, 2] = torch.arange(tokens) % 4
    pe = model.pe_embedder(ids)
    return {"img": torch.randn(1, tokens, hidden, generator=generator),
            "txt": torch.randn(1, text, hidden, generator=generator),
            "vec": torch.randn(1, hidden, generator=generator), "pe": pe}


def run_block(block, forward, inputs, single, vec=None):
    """The block's output under TrainingBlockForward (out of place, checkpointed) with `forward`, and the gradients
    of its inputs and of its weights for a fixed random output gradient."""
    from eridiffusion.trainers.blocks import prime_attention, training_attention
    from eridiffusion.trainers.comfy_compat import training_mode
    device, dtype = inputs["img"].device, inputs["img"].dtype
    prime_attention(device, dtype)      # (as training does: see its doc)
    leaves = {name: t.detach().clone().requires_grad_(name != "pe") for name, t in inputs.items()}
    block.requires_grad_(True)
    for name, parameter in block.named_parameters():      # (frozen, as the base model is: the kernels' case)
        if "query_norm" in name or "key_norm" in name:
            parameter.requires_grad_(False)
    block.zero_grad(set_to_none=True)
    run = TrainingBlockForward(block, checkpoint=True, out_of_place=True, forward=forward)
    # (0.33 rotates q and k by its eager, differentiable rope only while training)
    with training_mode(), training_attention(device):
        vec = leaves["vec"] if vec is None else vec      # (Chroma's: modulations given)
        if single:
            x = torch.cat((leaves["txt"], leaves["img"]), 1)
            outs = (run(x, vec=vec, pe=leaves["pe"]),)
        else:
            outs = run(img=leaves["img"], txt=leaves["txt"], vec=vec, pe=leaves["pe"])
        generator = torch.Generator().manual_seed(9)
        loss = sum((out * torch.randn(out.shape, generator=generator).to(out.device, out.dtype)).sum()
                   for out in outs)
        loss.backward()
    grads = [leaves[name].grad for name in ("img", "txt", "vec")]
    grads += [p.grad for p in block.parameters()]
    return outs, grads


def test_the_flux_blocks_training_forwards_are_comfyuis_bit_for_bit(tiny):
    """Outputs, input gradients and weight gradients of a double and a single block, checkpointed and out of
    place as training runs them: the training forwards against ComfyUI's own."""
    model = flux_blocks(tiny)
    inputs = block_inputs(model)
    for block, single in ((model.double_blocks[0], False), (model.single_blocks[0], True)):
        forward = flux_arch.Flux().training_block_forward(block)
        assert forward is (flux_arch.single_block_forward if single else flux_arch.double_block_forward)
        ours, comfy = run_block(block, forward, inputs, single), run_block(block, None, inputs, single)
        for a, b in zip(ours[0] + tuple(ours[1]), comfy[0] + tuple(comfy[1])):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_through_the_kernels_the_flux_blocks_training_forwards_are_comfyuis_bit_for_bit(tiny, dtype, monkeypatch):
    """With the kernels taking every call (Triton's interpreter), the training forwards, which write q, k and v
    into their concatenations and each projection's gradient in one piece, against ComfyUI's forwards whose
    QK norms and GELU run the same kernels one by one (as fused_forwards patches them)."""
    rms_norm_takes, taken_gelu_rows = fused.rms_norm_takes, fused._taken_gelu_rows
    monkeypatch.setattr(fused, "rms_norm_takes", lambda x, weight, interpret=False: rms_norm_takes(x, weight, True))
    monkeypatch.setattr(fused, "_taken_gelu_rows", lambda x, interpret=False: taken_gelu_rows(x, True))
    used = []
    for name in ("_JointAttentionInputs", "_SingleBlockInputs", "_FusedGeluTanhBeside"):
        function = getattr(fused, name)
        monkeypatch.setattr(fused, name, type(name, (function,), {"apply": classmethod(
            lambda cls, *args, _f=function, _n=name: used.append(_n) or _f.apply(*args))}))
    model = flux_blocks(tiny).to(dtype)
    inputs = {name: t.to(dtype) for name, t in block_inputs(model, tokens=24, text=8).items()}
    inputs["pe"] = block_inputs(model, tokens=24, text=8)["pe"]
    for block, single in ((model.double_blocks[0], False), (model.single_blocks[0], True)):
        for module in (block.norm if single else block.img_attn.norm, None if single else block.txt_attn.norm):
            if module is not None:
                for norm in (module.query_norm, module.key_norm):
                    monkeypatch.setattr(norm, "forward", fused.FusedRMSNormForward(norm))
        if single:
            monkeypatch.setattr(block.mlp_act, "forward", fused.FusedGeluTanhForward())
        forward = flux_arch.Flux().training_block_forward(block)
        ours, comfy = run_block(block, forward, inputs, single), run_block(block, None, inputs, single)
        for a, b in zip(ours[0] + tuple(ours[1]), comfy[0] + tuple(comfy[1])):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # forward and its recomputation of each block
    assert used == ["_JointAttentionInputs"] * 2 + ["_SingleBlockInputs", "_FusedGeluTanhBeside"] * 2


def test_chromas_blocks_training_forwards_are_comfyuis_bit_for_bit(tiny):
    """Chroma's blocks take their modulations as given (ModulationOut shift, scale, gate from its approximator)
    rather than computing them from vec: outputs and gradients, the modulations' included, against ComfyUI's."""
    from comfy.ldm.flux.layers import ModulationOut
    model = flux_blocks(tiny, "chroma")
    hidden, generator = model.hidden_size, torch.Generator().manual_seed(4)
    inputs = block_inputs(model)

    def modulations(count):
        return [torch.randn(1, 1, hidden, generator=generator) for _ in range(3 * count)]
    double_mods, single_mods = modulations(4), modulations(1)
    for block, single, mods in ((model.double_blocks[0], False, double_mods), (model.single_blocks[0], True,
                                                                               single_mods)):
        forward = flux_arch.Flux().training_block_forward(block)
        results = []
        for runs_forward in (forward, None):
            leaves = [m.clone().requires_grad_() for m in mods]
            given = ModulationOut(*leaves[:3]) if single else (
                (ModulationOut(*leaves[0:3]), ModulationOut(*leaves[3:6])),
                (ModulationOut(*leaves[6:9]), ModulationOut(*leaves[9:12])))
            outputs, grads = run_block(block, runs_forward, dict(inputs, vec=torch.zeros(())), single, vec=given)
            results.append((outputs, grads + [leaf.grad for leaf in leaves]))
        (ours, ours_grads), (comfy, comfy_grads) = results
        for a, b in zip(ours + tuple(ours_grads), comfy + tuple(comfy_grads)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_flux_familys_blocks_take_the_training_forwards_their_code_allows(tiny):
    """Chroma's blocks are Flux's (modulations given, not computed): both forwards. Flux.2's single blocks run a
    SiLU-gated MLP, not the GELU the fused concatenation writes: their own forward; its double blocks ours."""
    from eridiffusion.trainers.arch import chroma, flux2
    model = tiny.tiny_model("chroma").model.diffusion_model
    arch = chroma.Chroma()
    assert arch.training_block_forward(model.double_blocks[0]) is flux_arch.double_block_forward
    assert arch.training_block_forward(model.single_blocks[0]) is flux_arch.single_block_forward
    try:
        model = tiny.tiny_model("flux2").model.diffusion_model
    except Exception as error:      # (0.3.75 has no Flux.2)
        pytest.skip(f"no Flux.2 in this ComfyUI: {error}")
    arch = flux2.Flux2()
    assert arch.training_block_forward(model.double_blocks[0]) is flux_arch.double_block_forward
    assert arch.training_block_forward(model.single_blocks[0]) is None


def test_flux_blocks_keep_their_own_forward_where_the_code_differs(tiny, monkeypatch):
    from eridiffusion.trainers import comfy_compat
    model = flux_blocks(tiny)
    arch = flux_arch.Flux()
    double, single = model.double_blocks[0], model.single_blocks[0]
    assert arch.training_block_forward(double) and arch.training_block_forward(single)
    # another ComfyUI's block code (its source differs from the versions reproduced)
    monkeypatch.setitem(comfy_compat._KNOWN_FLUX_BLOCK_FORWARDS, "DoubleStreamBlock", set())
    assert arch.training_block_forward(double) is None and arch.training_block_forward(single)
    monkeypatch.undo()
    monkeypatch.setattr(double, "flipped_img_txt", True, raising=False)      # 0.3.75's other order
    assert arch.training_block_forward(double) is None
    monkeypatch.setattr(single, "mlp_act", torch.nn.SiLU())                 # Flux.2's MLP
    assert arch.training_block_forward(single) is None
    monkeypatch.undo()
    monkeypatch.setitem(fused.ENABLED, "concat", False)
    assert arch.training_block_forward(double) is None and arch.training_block_forward(single) is None


def test_flux_blocks_with_attention_patches_run_comfyuis_forward(tiny):
    model = flux_blocks(tiny)
    inputs = block_inputs(model)
    calls = []

    def attn1_output_patch(attn, extra_options):
        calls.append(attn.shape)
        return attn * 2
    options = {"patches": {"attn1_output_patch": [attn1_output_patch]}}
    double = model.double_blocks[0]
    with torch.no_grad():
        # (without gradients ComfyUI's forward adds to img and txt in place: each call gets its own copies)
        ours = flux_arch.double_block_forward(double, **{k: v.clone() for k, v in inputs.items()},
                                              transformer_options=options)
        comfy = type(double).forward(double, **{k: v.clone() for k, v in inputs.items()},
                                     transformer_options=options)
    assert all(torch.equal(a, b) for a, b in zip(ours, comfy))
    import inspect
    import comfy.ldm.flux.layers as layers
    # 0.33's blocks run the patch (ours by handing the call to ComfyUI's forward); 0.3.75's have no patches
    assert len(calls) == (2 if "attn1_output_patch" in inspect.getsource(layers.DoubleStreamBlock.forward) else 0)


# ----------------------------------------------------------------------------------------------- SD 3.5 (MMDiT)
def mmdit(tiny, qk_norm="rms"):
    import comfy.supported_models
    config = dict(tiny.SD3_MMDIT, qk_norm=qk_norm) if qk_norm else dict(tiny.SD3_MMDIT)
    model = comfy.supported_models.SD3(config).get_model({}, "").diffusion_model
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + (1 if parameter.ndim == 1 else 0))
    return model


def run_joint_block(block, forward, inputs):
    """A joint block's outputs under TrainingBlockForward (checkpointed) with `forward`, and the gradients of its
    inputs and weights (its QK norms frozen, as the base model's are)."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    block.requires_grad_(True)
    for name, parameter in block.named_parameters():
        if ".ln_q." in name or ".ln_k." in name:
            parameter.requires_grad_(False)
    block.zero_grad(set_to_none=True)
    run = TrainingBlockForward(block, checkpoint=True, out_of_place=False, forward=forward)
    outs = tuple(out for out in run(leaves["context"], leaves["x"], c=leaves["c"], use_checkpoint=False)
                 if out is not None)
    generator = torch.Generator().manual_seed(9)
    sum((out * torch.randn(out.shape, generator=generator).to(out.device, out.dtype)).sum() for out in outs).backward()
    return outs, [leaves[name].grad for name in ("context", "x", "c")] + [p.grad for p in block.parameters()]


def joint_block_inputs(model, context=9, tokens=16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    hidden = model.joint_blocks[0].x_block.attn.qkv.in_features
    return {"context": torch.randn(1, context, hidden, generator=generator).to(dtype),
            "x": torch.randn(1, tokens, hidden, generator=generator).to(dtype),
            "c": torch.randn(1, hidden, generator=generator).to(dtype)}


def assert_joint_blocks_agree(model, inputs, forward):
    for block in (model.joint_blocks[0], model.joint_blocks[-1]):       # (the last one's context block: pre_only)
        ours, comfy = run_joint_block(block, forward, inputs), run_joint_block(block, None, inputs)
        assert len(ours[0]) == len(comfy[0])
        for a, b in zip(ours[0] + tuple(ours[1]), comfy[0] + tuple(comfy[1])):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("qk_norm", ["rms", None])
def test_the_sd3_joint_blocks_training_forward_is_comfyuis_bit_for_bit(tiny, qk_norm):
    from eridiffusion.trainers.arch import sd3
    model = mmdit(tiny, qk_norm)
    assert model.joint_blocks[-1].context_block.pre_only
    forward = sd3.SD3().training_block_forward(model.joint_blocks[0])
    assert forward is sd3.joint_block_forward
    assert_joint_blocks_agree(model, joint_block_inputs(model), forward)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_through_the_kernels_the_sd3_joint_blocks_training_forward_is_comfyuis_bit_for_bit(tiny, dtype, monkeypatch):
    from eridiffusion.trainers.arch import sd3
    rms_norm_takes = fused.rms_norm_takes
    monkeypatch.setattr(fused, "rms_norm_takes", lambda x, weight, interpret=False: rms_norm_takes(x, weight, True))
    used = []
    function = fused._JointAttentionInputs
    monkeypatch.setattr(fused, "_JointAttentionInputs", type("Counted", (function,), {"apply": classmethod(
        lambda cls, *args: used.append(args[1]) or function.apply(*args))}))
    model = mmdit(tiny).to(dtype)
    for name, module in model.named_modules():
        if name.endswith(".ln_q") or name.endswith(".ln_k"):
            monkeypatch.setattr(module, "forward", fused.FusedRMSNormForward(module))
    assert_joint_blocks_agree(model, joint_block_inputs(model, dtype=dtype), sd3.joint_block_forward)
    assert used == [True] * 4       # forward and recomputation of each of the two blocks, MMDiT's layout


def test_sd3_blocks_keep_their_own_forward_where_the_code_differs(tiny, monkeypatch):
    from eridiffusion.trainers import comfy_compat
    from eridiffusion.trainers.arch import sd3
    model = mmdit(tiny)
    block = model.joint_blocks[0]
    assert sd3.SD3().training_block_forward(block) is sd3.joint_block_forward
    monkeypatch.setattr(comfy_compat, "_KNOWN_MMDIT_SOURCES", frozenset())
    assert sd3.SD3().training_block_forward(block) is None
    monkeypatch.undo()
    monkeypatch.setattr(block.x_block, "x_block_self_attn", True)          # SD 3.5 Medium's MMDiT-X
    assert sd3.SD3().training_block_forward(block) is None


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_on_the_gpu_the_concatenations_are_torchs_kernels_bit_for_bit(dtype):
    """Flux-dev's sizes at 1024²: 512 text and 4,096 image tokens, 24 heads of 128; a single block's 3,072-wide
    attention output beside its 12,288-wide MLP. Against torch's own norm, GELU and cat."""
    joined = norms_into_concatenation(dtype, "cuda", interpret=False, text=512, image=4096, heads=24)[0]
    norms = (rms_norm_module(128, dtype, "cuda", 1), rms_norm_module(128, dtype, "cuda", 2))
    grad = torch.randn(1, 24, 4608, 128, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    txt_qkv, txt_q, _ = qk_views(1, 512, 24, 128, dtype, "cuda", 4)
    img_qkv, img_q, _ = qk_views(1, 4096, 24, 128, dtype, "cuda", 5)
    out = torch.cat((norms[0](txt_q), norms[1](img_q)), 2)
    out.backward(grad)
    assert_same_bits([joined, (out, txt_qkv.grad, img_qkv.grad)])

    results = gelu_beside_attention(dtype, "cuda", interpret=False, tokens=4608, hidden=3072, mlp=12288)
    generator = torch.Generator().manual_seed(8)
    projection = (torch.randn(1, 4608, 3 * 3072 + 12288, generator=generator) * 3).to("cuda", dtype)
    attention = torch.randn(1, 4608, 3072, generator=generator).to("cuda", dtype).requires_grad_()
    projection.requires_grad_()
    x = torch.split(projection, [3 * 3072, 12288], dim=-1)[1]
    out = torch.cat((attention, torch.nn.functional.gelu(x, approximate="tanh")), -1)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to("cuda", dtype))
    assert_same_bits([results[0], (out, projection.grad, attention.grad)])


@pytest.mark.gpu
@needs_gpu
def test_on_the_gpu_the_flux_blocks_training_forwards_are_comfyuis_bit_for_bit(monkeypatch):
    """A Flux-dev double and single block (3,072 wide, 24 heads; random weights) in bf16 at 1024² (512 text and
    4,096 image tokens): outputs, input and weight gradients of the training forwards, through the kernels,
    against ComfyUI's forwards with torch's own norms, GELU and concatenations. Attention by SDPA's math
    backend: the fused backends' backward accumulates q's gradient in no fixed order (two runs of ComfyUI's own
    forward differ in the last bits)."""
    import comfy.ops
    from torch.nn.attention import SDPBackend
    from eridiffusion.trainers import blocks as training_blocks
    monkeypatch.setattr(training_blocks, "TRAINING_SDPA_PRIORITY", [SDPBackend.MATH])
    from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND, SingleStreamBlock
    torch.manual_seed(0)
    ops = comfy.ops.disable_weight_init
    blocks = (DoubleStreamBlock(3072, 24, mlp_ratio=4.0, qkv_bias=True, operations=ops),
              SingleStreamBlock(3072, 24, mlp_ratio=4.0, operations=ops))
    for block in blocks:
        with torch.no_grad():
            for parameter in block.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.02 + (1 if parameter.ndim == 1 else 0))
        block.to("cuda", torch.bfloat16)
    text, tokens = 512, 4096
    ids = torch.zeros(1, text + tokens, 3)
    ids[0, text:, 1] = torch.arange(tokens) // 64
    ids[0, text:, 2] = torch.arange(tokens) % 64
    generator = torch.Generator().manual_seed(1)
    inputs = {"img": torch.randn(1, tokens, 3072, generator=generator).to("cuda", torch.bfloat16),
              "txt": torch.randn(1, text, 3072, generator=generator).to("cuda", torch.bfloat16),
              "vec": torch.randn(1, 3072, generator=generator).to("cuda", torch.bfloat16),
              "pe": EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])(ids).to("cuda")}
    for block, single in zip(blocks, (False, True)):
        forward = flux_arch.Flux().training_block_forward(block)
        assert forward is not None
        ours, comfy = run_block(block, forward, inputs, single), run_block(block, None, inputs, single)
        for a, b in zip(ours[0] + tuple(ours[1]), comfy[0] + tuple(comfy[1])):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@needs_gpu
def test_on_the_gpu_the_sd3_joint_blocks_training_forward_is_comfyuis_bit_for_bit(monkeypatch):
    """An SD 3.5 Large joint block (2,432 wide, 38 heads of 64, RMS QK norms; random weights) in bf16 at 1024² (333
    context and 4,096 image tokens), against ComfyUI's forward with torch's kernels (SDPA's math backend)."""
    import comfy.ops
    from torch.nn.attention import SDPBackend
    from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
    from eridiffusion.trainers import blocks as training_blocks
    from eridiffusion.trainers.arch import sd3
    monkeypatch.setattr(training_blocks, "TRAINING_SDPA_PRIORITY", [SDPBackend.MATH])
    torch.manual_seed(0)
    block = JointBlock(2432, 38, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False, rmsnorm=False,
                       scale_mod_only=False, swiglu=False, qk_norm="rms", x_block_self_attn=False,
                       operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.02 + (1 if parameter.ndim == 1 else 0))
    block.to("cuda", torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    inputs = {"context": torch.randn(1, 333, 2432, generator=generator),
              "x": torch.randn(1, 4096, 2432, generator=generator),
              "c": torch.randn(1, 2432, generator=generator)}
    inputs = {name: t.to("cuda", torch.bfloat16) for name, t in inputs.items()}
    from eridiffusion.trainers.blocks import prime_attention, training_attention
    from eridiffusion.trainers.comfy_compat import training_mode
    prime_attention(torch.device("cuda"), torch.bfloat16)
    with training_mode(), training_attention(torch.device("cuda")):
        ours, comfy = run_joint_block(block, sd3.joint_block_forward, inputs), run_joint_block(block, None, inputs)
    for a, b in zip(ours[0] + tuple(ours[1]), comfy[0] + tuple(comfy[1])):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
