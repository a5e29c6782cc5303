"""Adapter gradients are the true derivatives of the training loss, on every architecture, with and without
gradient checkpointing, checked against float64 central finite differences (which need no autograd):

    (L(θ + εv) - L(θ - εv)) / 2ε  ≈  ∇L(θ)·v   for random directions v.

ComfyUI's Flux blocks (Chroma's and Flux.2's too) update tensors in place, which plain autograd cannot differentiate and
checkpointing recomputes wrongly; these tests are what shows trainers/blocks.py makes them right.
"""
import pytest
import torch

from conftest import write_images
from helpers import run

ARCHS = ["sdxl", "sd3", "flux", "chroma", "qwen_image", "flux2", "zimage"]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def flux_rotary_table_in_the_models_dtype(monkeypatch):
    rotary_table_in_fp64(monkeypatch)


def rotary_table_in_fp64(monkeypatch):
    """ComfyUI builds Flux's rotary table in fp32 and rotates q and k in fp32 even in an fp64 model; that
    rounding is far above the 1e-6 asked of the fp64 check, so the reference runs the (constant) table in
    the model's dtype. Nothing trainable is changed."""
    import comfy.ldm.flux.layers
    rope = comfy.ldm.flux.layers.rope
    monkeypatch.setattr(comfy.ldm.flux.layers, "rope", lambda pos, dim, theta: rope(pos, dim, theta).double())


def _run(comfy_folders, tiny, arch, dtype, checkpointing, precision, seed=0, captions=None):
    """A TrainingRun on the tiny model in `dtype`, with a random (non-zero) LoRA, and one fixed micro-batch (of
    the two images' own `captions` when given)."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents, EriTrainingImages
    from eridiffusion.trainers.config import TrainingSettings
    from eridiffusion.trainers.loop import TrainingRun
    name = "grad_captions" if captions else "grad"
    folder = comfy_folders["input"] / name
    if not folder.exists():
        write_images(folder, ((64, 64), (64, 64)))
        for i, caption in enumerate(captions or ()):
            (folder / f"img{i}.txt").write_text(caption)
    dataset = run(EriTrainingImages, folder=name, resolution=64, trigger_word="", default_caption="", flip=False,
                  min_side=64, max_side=64, max_upscale=1.0)[0]
    with torch.inference_mode(False):
        model, clip, vae = tiny.tiny_model(arch, dtype=dtype), tiny.tiny_clip(arch), tiny.tiny_vae(arch)
    latents = run(EriCacheLatents, dataset=dataset, vae=vae, batch_size=4)[0]
    text = run(EriCacheCaptions, dataset=dataset, clip=clip)[0]
    adapter = run(EriCreateAdapter, model=model, adapter_type="lora", rank=2, alpha=2.0, target="all_linear",
                  seed=0, dtype="fp32")[0]
    # A partly trained adapter: LoRA's own initial `down`, and a small random `up` (a new one is all zeros,
    # where the gradient of `down` vanishes).
    gen = torch.Generator().manual_seed(seed)
    adapter = adapter.replace(weights={k: v if "lora_down" in k else 0.05 * torch.randn(v.shape, generator=gen)
                                       for k, v in adapter.weights.items()})
    settings = TrainingSettings(precision=precision, gradient_checkpointing=checkpointing, batch_size=2,
                                timestep_sampling="uniform")
    with torch.inference_mode(False):
        training = TrainingRun(model, adapter, latents, text, settings, end_step=1)
        for layer in training.layers.values():
            layer.to(dtype)
        micro_batch = training._micro_batch()
    return training, micro_batch


def _loss_and_gradient(training, micro_batch):
    # ComfyUI's training flag as train() sets it: 0.33's Flux rotates q and k with comfy-kitchen's inference
    # kernel without it (no float64, and not meant for autograd).
    from eridiffusion.trainers.comfy_compat import training_mode
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        for p in training.params:
            p.grad = None
        loss = training._loss(micro_batch)
        loss.backward()
        return loss.detach(), [p.grad.detach().double().clone() for p in training.params]


def _loss_at(training, micro_batch, direction, eps):
    from eridiffusion.trainers.comfy_compat import training_mode
    with torch.inference_mode(False), torch.no_grad(), training_mode():
        for p, v in zip(training.params, direction):
            p.add_(eps * v.to(p.dtype))
        loss = training._loss(micro_batch).item()
        for p, v in zip(training.params, direction):
            p.sub_(eps * v.to(p.dtype))
        return loss


def _directions(gradient, count, seed=1):
    """Unit directions: the gradient's own (where ∇L·v = |∇L|) and `count` random ones."""
    gen = torch.Generator().manual_seed(seed)
    candidates = [list(gradient)] + [[torch.randn(g.shape, generator=gen, dtype=torch.float64) for g in gradient]
                                     for _ in range(count)]
    for v in candidates:
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        yield [x / norm for x in v]


def _norm(tensors):
    return torch.sqrt(sum((t * t).sum() for t in tensors)).item()


def _dot(gradient, direction):
    return sum((g * v).sum() for g, v in zip(gradient, direction)).item()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp64_adapter_gradients_match_central_finite_differences(comfy_folders, tiny, arch, checkpointing):
    training, micro_batch = _run(comfy_folders, tiny, arch, torch.float64, checkpointing, "fp32")
    _, gradient = _loss_and_gradient(training, micro_batch)
    eps = 1e-4
    for direction in _directions(gradient, 2):
        finite = (_loss_at(training, micro_batch, direction, eps) -
                  _loss_at(training, micro_batch, direction, -eps)) / (2 * eps)
        analytic = _dot(gradient, direction)
        # relative to the gradient's size: a random direction's derivative can be near zero
        assert abs(analytic - finite) <= 1e-6 * _norm(gradient), (arch, analytic, finite)
    assert _norm(gradient) > 1e-6, "the loss must depend on the adapter for this check to mean anything"


def _assert_gradient_matches_finite_differences(training, micro_batch):
    """The analytic gradient along two random directions equals the central finite difference (fp64)."""
    _, gradient = _loss_and_gradient(training, micro_batch)
    eps = 1e-4
    for direction in _directions(gradient, 2):
        finite = (_loss_at(training, micro_batch, direction, eps) -
                  _loss_at(training, micro_batch, direction, -eps)) / (2 * eps)
        assert abs(_dot(gradient, direction) - finite) <= 1e-6 * _norm(gradient)
    assert _norm(gradient) > 1e-6


def assert_reference_gradients_match_finite_differences(p, tiny, arch):
    """Edit pairs (Flux Kontext, Qwen-Image-Edit; call rotary_table_in_fp64 first): on the fp64 tiny `arch` with a
    random LoRA, a micro-batch of `p`'s paired latents carries each image's reference latent, the adapter
    gradient matches central finite differences, and the reference changes the loss."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.trainers.config import TrainingSettings
    from eridiffusion.trainers.loop import TrainingRun
    with torch.inference_mode(False):
        model = tiny.tiny_model(arch, dtype=torch.float64)
    adapter = run(EriCreateAdapter, model=model, adapter_type="lora", rank=2, alpha=2.0, target="all_linear",
                  seed=0, dtype="fp32")[0]
    gen = torch.Generator().manual_seed(0)
    adapter = adapter.replace(weights={k: v if "lora_down" in k else 0.05 * torch.randn(v.shape, generator=gen)
                                       for k, v in adapter.weights.items()})
    settings = TrainingSettings(precision="fp32", batch_size=2, timestep_sampling="uniform")
    with torch.inference_mode(False):
        training = TrainingRun(model, adapter, p["latents"], p["captions"], settings, end_step=1)
        for layer in training.layers.values():
            layer.to(torch.float64)
        micro_batch = training._micro_batch()
    reference, x0 = micro_batch["cond.ref_latent"], micro_batch["x0"]
    assert reference.shape[0] == x0.shape[0] and reference.numel() == x0.numel()   # Qwen-Image's: a frame axis
    _assert_gradient_matches_finite_differences(training, micro_batch)
    without = {k: v for k, v in micro_batch.items() if k != "cond.ref_latent"}
    assert not torch.allclose(_loss_and_gradient(training, without)[0], _loss_and_gradient(training, micro_batch)[0])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_zimage_gradients_with_captions_of_different_lengths_match_finite_differences(comfy_folders, tiny,
                                                                                      checkpointing):
    """Z-Image runs each sample of such a micro-batch on its own (its captions are never padded)."""
    training, micro_batch = _run(comfy_folders, tiny, "zimage", torch.float64, checkpointing, "fp32",
                                 captions=("red", "a large red square on a blue background, seen from above"))
    assert {"cond.context_0", "cond.context_1"} <= set(micro_batch), "one context per sample"
    _assert_gradient_matches_finite_differences(training, micro_batch)


# bf16 rounds every matmul to 8 significant bits; on these tiny random models that leaves 1-3 % in every
# layer's gradient alike (measured per layer: the first layers as much as the last, so it is bf16's own
# rounding, not a wrong path), hence 3e-2 rather than 1e-2.
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-3), ("bf16", 3e-2)])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_and_bf16_adapter_gradients_are_close_to_the_fp64_gradient(comfy_folders, tiny, arch, precision, tolerance):
    exact_run, exact_batch = _run(comfy_folders, tiny, arch, torch.float64, True, "fp32")
    _, exact = _loss_and_gradient(exact_run, exact_batch)
    low_run, low_batch = _run(comfy_folders, tiny, arch, torch.float32, True, precision)
    _, low = _loss_and_gradient(low_run, low_batch)
    difference = _norm([a - b for a, b in zip(exact, low)])
    assert difference <= tolerance * _norm(exact), (arch, precision, difference / _norm(exact))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_qwen_image_gradients_with_captions_of_different_lengths_match_finite_differences(comfy_folders, tiny,
                                                                                          checkpointing):
    """A Qwen-Image batch whose captions differ in length runs the model once per sample (as ComfyUI runs each
    conditioning alone): its gradients are the loss's too."""
    write_images(comfy_folders["input"] / "grad", ((64, 64), (64, 64)))
    (comfy_folders["input"] / "grad" / "img1.txt").write_text("a much longer photo of the second pattern, in blue")
    training, micro_batch = _run(comfy_folders, tiny, "qwen_image", torch.float64, checkpointing, "fp32")
    assert {"cond.context.0", "cond.context.1"} <= set(micro_batch) and "cond.context" not in micro_batch
    _assert_gradient_matches_finite_differences(training, micro_batch)
