"""Text-encoder LoRA (Create adapter's text_encoder) on tiny models: its gradients are the loss's derivatives, the
file Save adapter writes gives the trained conditioning in ComfyUI's stock LoraLoader (model + clip), the CLIP
given to Train steps keeps encoding as before, training resumes bit-exactly, and the learning rate is its own."""
import logging

import pytest
import torch

from helpers import model_output, prepared, run, settings

# architecture -> the text_encoder option trained, and the kohya key prefixes its file must hold
CASES = {"sdxl": ("clip_l+clip_g", {"lora_te1_", "lora_te2_"}), "sd3": ("clip_l+clip_g", {"lora_te1_", "lora_te2_"}),
         "flux": ("clip_l", {"lora_te1_"}), "flux_t5": ("all", {"lora_te1_", "lora_te2_"})}


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
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


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
    # the text encoder trained: the pooled output moved (on Flux the context is T5's, which stays frozen)
    assert not torch.allclose(trained[1], before[1])
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
    _, _, _, _, clip = _train(p, 2)
    assert clip is not p["clip"]
    for a, b in zip(_conditioning(p["clip"]), before):
        assert torch.equal(a, b)
    for a, b in zip(_conditioning(other), before):
        assert torch.equal(a, b)
    assert not p["clip"].patcher.object_patches and not other.patcher.object_patches


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


def test_only_the_chosen_encoders_get_adapters(comfy_folders, tiny):
    p = _prepared(comfy_folders, tiny, "sdxl", option="clip_l")
    paths = {t[0] for t in p["adapter"].spec.targets if t[0].startswith("text_encoders.")}
    assert paths and all(path.startswith("text_encoders.clip_l.") for path in paths)
    # 3 layers x (q, k, v, out, fc1, fc2)
    assert len(paths) == 18
    flux = _prepared(comfy_folders, tiny, "flux", option="clip_l+clip_g")   # Flux has no CLIP-G: CLIP-L alone
    assert {t[0].split(".")[1] for t in flux["adapter"].spec.targets if t[0].startswith("text_encoders.")} == {"clip_l"}
