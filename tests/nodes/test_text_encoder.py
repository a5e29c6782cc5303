"""Text-encoder LoRA (Create adapter's text_encoder) on tiny models: its gradients are the loss's derivatives, the
file Save adapter writes gives the trained conditioning in ComfyUI's stock LoraLoader (model + clip), the CLIP
given to Train steps keeps encoding as before, training resumes bit-exactly, and the learning rate is its own."""
import logging

import pytest
import torch

from helpers import model_output, prepared, run, settings

# architecture -> the text_encoder option trained, and the kohya key prefixes its file must hold
CASES = {"sdxl": ("clip_l+clip_g", {"lora_te1_", "lora_te2_"}), "sd3": ("clip_l+clip_g", {"lora_te1_", "lora_te2_"}),
         "flux": ("clip_l", {"lora_te1_"}), "flux_t5": ("all", {"lora_te1_", "lora_te2_"}),
         "chroma": ("all", {"lora_te1_"})}     # T5 alone


def _prepared(comfy_folders, tiny, case, option=None, **create):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    arch = case.split("_")[0]
    p = prepared(comfy_folders, tiny, arch)
    kw = dict(model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp", seed=0,
              dtype="fp32", text_encoder=option or CASES[case][0], clip=p["clip"])
    kw.update(create)
    p["adapter"] = run(EriCreateAdapter, **kw)[0]
    return p


def _train(p, steps, adapter=None, **overrides):
    """Train steps' outputs: model, adapter, loss, samples, clip."""
    from eridiffusion.nodes.train import EriTrainSteps
    kw = dict(learning_rate=1e-2, text_encoder_lr=5e-3)
    kw.update(overrides)
    return run(EriTrainSteps, model=p["model"], adapter=adapter or p["adapter"], latents=p["latents"],
               captions=p["captions"], settings=settings(**kw), steps=steps, clip=p["clip"])


def _conditioning(clip, text="a photo"):
    """Context and pooled output (Chroma's T5 has none: context alone)."""
    with torch.inference_mode():
        return tuple(t for t in clip.encode_from_tokens(clip.tokenize(text), return_pooled=True) if t is not None)


@pytest.fixture(params=list(CASES))
def p(request, comfy_folders, tiny):
    p = _prepared(comfy_folders, tiny, request.param)
    p["case"] = request.param
    return p


def test_stock_lora_loader_gives_the_trained_conditioning_and_model_output(p, comfy_folders, caplog):
    from nodes import LoraLoader
    from safetensors.torch import load_file
    from eridiffusion.nodes.adapter import EriSaveAdapter
    case = p["case"]
    before = _conditioning(p["clip"])
    model, adapter, _, _, clip = _train(p, 4)
    trained = _conditioning(clip)
    # the text encoder trained: the pooled output moved (on Flux the context is T5's, which stays frozen; Chroma's
    # T5 has no pooled output)
    assert len(trained) == 1 if case == "chroma" else not torch.allclose(trained[1], before[1])
    assert torch.equal(trained[0], before[0]) if case == "flux" else not torch.allclose(trained[0], before[0])
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix="te/test", save_dtype="fp32")[0]
    keys = load_file(str(comfy_folders["loras"] / name)).keys()
    prefixes = {k[:9] for k in keys if k.startswith("lora_te")}
    assert prefixes == CASES[case][1]
    with caplog.at_level(logging.WARNING):
        loaded_model, loaded_clip = LoraLoader().load_lora(p["model"], p["clip"], name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    got = _conditioning(loaded_clip)
    for a, b in zip(got, trained):
        assert (a - b).norm() <= 1e-4 * b.norm(), case
    expected = model_output(model, p)
    assert (model_output(loaded_model, p) - expected).norm() <= 1e-3 * expected.norm()


def test_the_clip_given_to_train_steps_encodes_as_before(p):
    before = _conditioning(p["clip"])
    other = p["clip"].clone()
    patches = dict(p["clip"].patcher.object_patches)    # (0.33's CLIP has one of its own)
    _, _, _, _, clip = _train(p, 2)
    assert clip is not p["clip"]
    for a, b in zip(_conditioning(p["clip"]), before):
        assert torch.equal(a, b)
    for a, b in zip(_conditioning(other), before):
        assert torch.equal(a, b)
    assert p["clip"].patcher.object_patches == patches == other.patcher.object_patches
    assert any(key.endswith(".forward") for key in clip.patcher.object_patches)


def test_resume_with_the_text_encoder_training_is_bit_exact(p, comfy_folders):
    from eridiffusion.nodes.adapter import EriLoadAdapter, EriSaveAdapter
    kw = dict(schedule="cosine", warmup_steps=1, total_steps=4, caption_dropout=0.3)
    _, straight, _, _, _ = _train(p, 4, **kw)
    _, first, _, _, _ = _train(p, 2, **kw)
    name = run(EriSaveAdapter, adapter=first, filename_prefix="te/resume", save_dtype="fp16")[0]
    resumed = run(EriLoadAdapter, lora_name=name)[0]
    assert resumed.spec == first.spec and resumed.step == 2
    _, second, _, _, _ = _train(p, 2, adapter=resumed, **kw)
    assert second.history.losses == straight.history.losses
    assert all(torch.equal(straight.weights[k], second.weights[k]) for k in straight.weights)
    assert any(k.startswith("text_encoders.") for k in straight.weights)


def test_text_encoder_lr_is_the_text_encoders_own(comfy_folders, tiny):
    """With text_encoder_lr tiny, the text-encoder layers barely move while the UNet's move as before; with it
    0, both train at learning_rate."""
    p = _prepared(comfy_folders, tiny, "sdxl")
    start = p["adapter"].weights
    def moved(adapter, te):
        return max((adapter.weights[k] - start[k]).abs().max().item() for k in start
                   if k.startswith("text_encoders.") == te)
    _, slow, _, _, _ = _train(p, 2, learning_rate=1e-2, text_encoder_lr=1e-8)
    _, same, _, _, _ = _train(p, 2, learning_rate=1e-2, text_encoder_lr=0.0)
    assert moved(slow, te=True) < 1e-5 < moved(same, te=True)
    assert moved(slow, te=False) > 1e-4 and moved(same, te=False) > 1e-4


def test_a_text_encoder_adapter_without_a_clip_is_a_clear_error(comfy_folders, tiny):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.nodes.train import EriTrainSteps
    p = _prepared(comfy_folders, tiny, "sdxl")
    with pytest.raises(ValueError, match="clip"):
        run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
            seed=0, dtype="fp32", text_encoder="clip_l")
    with pytest.raises(ValueError, match="clip input"):
        run(EriTrainSteps, model=p["model"], adapter=p["adapter"], latents=p["latents"], captions=p["captions"],
            settings=settings(), steps=1)


def test_a_text_encoder_adapter_on_qwen_image_is_refused_naming_the_input(comfy_folders, tiny):
    """Training Qwen-Image's Qwen2.5-VL is not supported: Create adapter says so rather than train the model alone."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    with torch.inference_mode(False):
        model, clip = tiny.tiny_model("qwen_image"), tiny.tiny_clip("qwen_image")
    common = dict(model=model, adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp", seed=0, dtype="fp32")
    with pytest.raises(ValueError, match="text_encoder all: training the text encoder of a Qwen-Image MODEL is not "
                                         "supported; set text_encoder to none"):
        run(EriCreateAdapter, **common, text_encoder="all", clip=clip)
    assert run(EriCreateAdapter, **common, clip=clip)[0].spec.text_encoder == "none"


@pytest.mark.parametrize("option", ["clip_l", "all"])
def test_z_images_qwen3_text_encoder_is_refused_with_a_clear_error(comfy_folders, tiny, option):
    """Z-Image's text encoder (Qwen3-4B) gets no adapters: Create adapter says so rather than training nothing."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    p = prepared(comfy_folders, tiny, "zimage")
    with pytest.raises(ValueError, match=f"text_encoder {option}: training the text encoder of a Z-Image model is "
                                         f"not supported; set text_encoder to none"):
        run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
            seed=0, dtype="fp32", text_encoder=option, clip=p["clip"])


def test_only_the_chosen_encoders_get_adapters(comfy_folders, tiny):
    p = _prepared(comfy_folders, tiny, "sdxl", option="clip_l")
    paths = {t[0] for t in p["adapter"].spec.targets if t[0].startswith("text_encoders.")}
    assert paths and all(path.startswith("text_encoders.clip_l.") for path in paths)
    # 3 layers x (q, k, v, out, fc1, fc2)
    assert len(paths) == 18
    flux = _prepared(comfy_folders, tiny, "flux", option="clip_l+clip_g")   # Flux has no CLIP-G: CLIP-L alone
    assert {t[0].split(".")[1] for t in flux["adapter"].spec.targets if t[0].startswith("text_encoders.")} == {"clip_l"}


def _gradient_run(comfy_folders, tiny, case, dtype, checkpointing=False):
    """A TrainingRun in `dtype` (MODEL and CLIP) with a random, non-zero text-encoder and UNet LoRA, one micro-batch."""
    from eridiffusion.trainers.config import TrainingSettings
    from eridiffusion.trainers.loop import TrainingRun
    p = _prepared(comfy_folders, tiny, case, rank=2, alpha=2.0)
    with torch.inference_mode(False):
        model = tiny.tiny_model(case.split("_")[0], dtype=dtype)
        p["clip"].cond_stage_model.to(dtype)
    gen = torch.Generator().manual_seed(0)
    adapter = p["adapter"].replace(weights={k: v if "lora_down" in k else 0.05 * torch.randn(v.shape, generator=gen)
                                            for k, v in p["adapter"].weights.items()})
    settings_ = TrainingSettings(precision="fp32", gradient_checkpointing=checkpointing, batch_size=2,
                                 timestep_sampling="uniform")
    with torch.inference_mode(False):
        training = TrainingRun(model, adapter, p["latents"], p["captions"], settings_, end_step=1, clip=p["clip"])
        for layer in training.layers.values():
            layer.to(dtype)
        micro_batch = training._micro_batch()
    te = [i for i, (path, layer) in enumerate((path, layer) for path, layer in training.layers.items()
                                              for _ in layer.parameters()) if path.startswith("text_encoders.")]
    return training, micro_batch, te


@pytest.fixture
def text_encoders_in_their_own_dtype(monkeypatch):
    """ComfyUI's CLIP and T5 ask their token embeddings for float32 whatever the weights' dtype, and CLIP rounds
    its output with .float(), so an fp64 text encoder computes in fp32, whose rounding is far above the 1e-6
    asked of the fp64 check: here an embedding of fp64 weights answers in fp64 (the layers after it compute in
    their input's dtype) and .float() leaves fp64 tensors as they are. Nothing trainable changes."""
    import comfy.ops
    to_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else to_float(self, *a, **k))
    for ops in {comfy.ops.disable_weight_init, comfy.ops.manual_cast}:
        forward = ops.Embedding.forward

        def own_dtype(self, *args, _forward=forward, **kwargs):
            if self.weight.dtype == torch.float64:
                kwargs.pop("out_dtype", None)
                args = args[:1]
            return _forward(self, *args, **kwargs)
        monkeypatch.setattr(ops.Embedding, "forward", own_dtype)


def _gradient(training, micro_batch):
    from eridiffusion.trainers.comfy_compat import training_mode
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        return [g.detach().double() for g in torch.autograd.grad(
            training._loss(micro_batch), training.params, allow_unused=True, materialize_grads=True)]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("case", list(CASES))
def test_text_encoder_gradients_match_float64_finite_differences(comfy_folders, tiny, case, checkpointing,
                                                                 text_encoders_in_their_own_dtype, monkeypatch):
    """(L(θ + εv) - L(θ - εv)) / 2ε ≈ ∇L·v along random directions v of the text-encoder layers alone, with the
    text encoder's blocks recomputed in backward (gradient_checkpointing) or not."""
    from test_gradients import _dot, _loss_at, _norm, rotary_table_in_fp64
    rotary_table_in_fp64(monkeypatch)
    training, micro_batch, te = _gradient_run(comfy_folders, tiny, case, torch.float64, checkpointing)
    checkpointed = [key for key, patch in training.text_encoder.patcher.object_patches.items()
                    if getattr(patch, "checkpoint", False)]
    assert bool(checkpointed) == checkpointing
    gradient = _gradient(training, micro_batch)
    te_gradient = [gradient[i] for i in te]
    assert _norm(te_gradient) > 1e-6, "the loss must depend on the text encoder's adapter"
    gen = torch.Generator().manual_seed(1)
    eps = 1e-4
    for _ in range(3):
        direction = [torch.randn(g.shape, generator=gen, dtype=torch.float64) if i in te else torch.zeros_like(g)
                     for i, g in enumerate(gradient)]
        norm = _norm(direction)
        direction = [v / norm for v in direction]
        finite = (_loss_at(training, micro_batch, direction, eps)
                  - _loss_at(training, micro_batch, direction, -eps)) / (2 * eps)
        analytic = _dot(gradient, direction)
        assert abs(analytic - finite) <= 1e-6 * _norm(te_gradient), (case, analytic, finite)


@pytest.mark.parametrize("arch, encoders", [("sdxl", ("clip_l", "clip_g")), ("sd3", ("clip_l", "clip_g", "t5xxl")),
                                            ("flux", ("clip_l", "t5xxl")), ("chroma", ("t5xxl",))])
def test_every_text_encoder_key_is_one_comfyuis_loader_maps_to_that_layer(arch, encoders):
    """Full-size layer names of each architecture's text encoders (no weights needed: comfy.lora reads the names),
    CLIP-G's 32 layers and T5-XXL's 24 blocks included."""
    import comfy.lora
    from eridiffusion.trainers import text_encoder
    layers = {"clip_l": (12, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                              "mlp.fc1", "mlp.fc2")),
              "clip_g": (32, ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")),
              "t5xxl": (24, ("layer.0.SelfAttention.q", "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0",
                             "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo"))}
    stem = {"clip_l": "clip_l.transformer.text_model.encoder.layers",
            "clip_g": "clip_g.transformer.text_model.encoder.layers", "t5xxl": "t5xxl.transformer.encoder.block"}
    names = [f"{stem[e]}.{i}.{layer}" for e in encoders for i in range(layers[e][0]) for layer in layers[e][1]]

    class Names(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return {f"{n}.weight": None for n in names}
    key_map = comfy.lora.model_lora_keys_clip(Names(), {})
    for name in names:
        assert text_encoder._CLIP_LAYER.match(name) or text_encoder._T5_LAYER.match(name)
        key = text_encoder.file_key(text_encoder.PREFIX + name, arch)
        assert key.startswith("lora_te") and key_map.get(key) == f"{name}.weight", (arch, name, key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [dict(adapter_type="lora", dora=True), dict(adapter_type="lokr", rank=2),
                                  dict(adapter_type="loha", rank=2)], ids=["dora", "lokr", "loha"])
def test_dora_lokr_and_loha_text_encoder_adapters_load_in_the_stock_lora_loader_as_trained(comfy_folders, tiny, kind):
    from nodes import LoraLoader
    from eridiffusion.nodes.adapter import EriSaveAdapter
    p = _prepared(comfy_folders, tiny, "sdxl", option="clip_l", **kind)
    before = _conditioning(p["clip"])
    _, adapter, _, _, clip = _train(p, 3)
    trained = _conditioning(clip)
    assert not torch.allclose(trained[0], before[0])
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix=f"te/{kind['adapter_type']}", save_dtype="fp32")[0]
    _, loaded = LoraLoader().load_lora(p["model"], p["clip"], name, 1.0, 1.0)
    for a, b in zip(_conditioning(loaded), trained):
        assert (a - b).norm() <= 1e-4 * b.norm()


@pytest.mark.parametrize("overrides", [dict(precision="bf16", batch_size=2, grad_accumulation=2),
                                       dict(precision="fp16", ema=True, ema_decay=0.9),
                                       dict(optimizer_offload=True, precision="bf16")],
                         ids=["bf16_batch2_accumulated", "fp16_ema", "offloaded"])
def test_text_encoder_training_runs_with_other_settings(comfy_folders, tiny, overrides):
    p = _prepared(comfy_folders, tiny, "sdxl")
    _, adapter, history, _, clip = _train(p, 3, **overrides)
    assert all(torch.isfinite(torch.tensor(history.losses)))
    te = [k for k in adapter.weights if k.startswith("text_encoders.") and "lora_up" in k]
    assert te and any(adapter.weights[k].abs().max() > 0 for k in te)
    assert (adapter.ema is not None) == bool(overrides.get("ema"))


def test_without_a_text_encoder_adapter_the_clip_passes_through_and_nothing_else_changes(comfy_folders, tiny):
    from eridiffusion.nodes.train import EriTrainSteps
    p = _prepared(comfy_folders, tiny, "sdxl", option="none")
    assert not any(t[0].startswith("text_encoders.") for t in p["adapter"].spec.targets)
    plain = run(EriTrainSteps, model=p["model"], adapter=p["adapter"], latents=p["latents"], captions=p["captions"],
                settings=settings(), steps=2)
    with_clip = _train(p, 2, learning_rate=1e-3, text_encoder_lr=0.0)
    assert with_clip[4] is p["clip"] and plain[4] is None
    assert with_clip[1].history.losses == plain[1].history.losses


def test_samples_while_training_the_text_encoder_encode_the_prompts_with_it(comfy_folders, tiny):
    """Sampling settings' prompts (and negatives) are encoded again by the adapter's text encoder each round, as
    the Train steps' clip output encodes them; training stays bit-identical with or without samples."""
    from eridiffusion.nodes.sample import EriSamplingSettings
    from eridiffusion.trainers.sampling import with_text_encoder
    p = _prepared(comfy_folders, tiny, "sdxl")
    sampling = run(EriSamplingSettings, vae=p["vae"], prompts="a red square\na blue circle --n dark",
                   negative_prompt="blurry", every_n_steps=2, seed=5, seed_mode="fixed", width=64, height=64,
                   sampler_name="euler", scheduler="normal", steps=2, cfg=3.0, guidance=3.5,
                   filename_prefix="eri_samples/te", clip=p["clip"])[0]
    _, plain, _, _, _ = _train(p, 3)
    from eridiffusion.nodes.train import EriTrainSteps
    _, sampled, _, images, clip = run(
        EriTrainSteps, model=p["model"], adapter=p["adapter"], latents=p["latents"], captions=p["captions"],
        settings=settings(learning_rate=1e-2, text_encoder_lr=5e-3), steps=3, clip=p["clip"], sampling=sampling)
    assert images.shape[0] == 4     # two prompts after steps 2 and 3
    assert sampled.history.losses == plain.history.losses
    assert all(torch.equal(plain.weights[k], sampled.weights[k]) for k in plain.weights)
    encoded = with_text_encoder(sampling, sampled)
    with torch.inference_mode():
        for (label, cond), text in zip(encoded.positives, ("a red square", "a blue circle")):
            expected = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            assert label == text and torch.allclose(cond[0][0], expected[0][0], atol=1e-6)
        assert torch.allclose(encoded.negative[0][0], clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))[0][0],
                              atol=1e-6)
        dark = clip.encode_from_tokens_scheduled(clip.tokenize("dark"))[0][0]
        assert torch.allclose(encoded.options[1].negative[0][0], dark, atol=1e-6)
    assert not torch.allclose(encoded.positives[0][1][0][0], sampling.positives[0][1][0][0])
