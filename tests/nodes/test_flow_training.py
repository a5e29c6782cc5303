"""SD 3.5, Flux, Chroma, Qwen-Image, Flux.2 and Z-Image LoRA end to end, in-process, on tiny models built with
ComfyUI's classes: the flow objective lowers the loss, files load in the stock LoRA loader with the same output,
training chains and resumes bit-exactly, and fp8 base weights train."""
import logging

import pytest
import torch

from helpers import assert_chained_and_resumed_equal_one_run, fixed_loss, model_output, prepared, run, train

ARCHS = ["sd3", "flux", "flux_schnell", "chroma", "qwen_image", "flux2", "zimage"]


@pytest.fixture(params=ARCHS)
def p(request, comfy_folders, tiny):
    return prepared(comfy_folders, tiny, arch=request.param)


def test_training_lowers_the_loss_on_four_images_in_50_steps(p):
    before = fixed_loss(p["model"], p)
    model, adapter, history = train(p, 50, learning_rate=1e-2)
    after = fixed_loss(model, p)
    names = {"SD3": "sd3", "Flux": "flux", "Chroma": "chroma", "QwenImage": "qwen_image", "Flux2": "flux2",
             "Lumina2": "zimage"}
    assert adapter.spec.arch == names[type(p["model"].model).__name__]
    assert len(history.losses) == 50 and all(loss == loss for loss in history.losses)
    assert after < 0.9 * before, (before, after)


def test_saved_file_loads_in_stock_lora_loader_with_the_same_output_and_no_unloaded_keys(p, caplog):
    from nodes import LoraLoaderModelOnly
    from eridiffusion.nodes.adapter import EriSaveAdapter
    trained_model, adapter, _ = train(p, 5, learning_rate=1e-2)
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix="eri/flow", save_dtype="fp32")[0]
    with caplog.at_level(logging.WARNING):
        (loaded,) = LoraLoaderModelOnly().load_lora_model_only(p["model"], name, 1.0)
    assert "lora key not loaded" not in caplog.text
    expected, got, base = model_output(trained_model, p), model_output(loaded, p), model_output(p["model"], p)
    assert not torch.allclose(expected, base)
    assert (got - expected).norm() / expected.norm() <= 1e-3


@pytest.mark.parametrize("arch, layers", [
    # Chroma's approximator (distilled_guidance_layer), its only modulation
    ("chroma", {"distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj"}),
    # Flux.2's one modulation per stream for all blocks (Flux.1 has one per block instead)
    ("flux2", {"double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"}),
])
def test_all_linear_adapts_the_modulation_and_loads_in_the_stock_lora_loader(comfy_folders, tiny, caplog, arch, layers):
    from nodes import LoraLoaderModelOnly
    from eridiffusion.nodes.adapter import EriCreateAdapter, EriSaveAdapter
    p = prepared(comfy_folders, tiny, arch=arch)
    adapter = run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="all_linear",
                  seed=0, dtype="fp32")[0]
    assert layers <= {t[0] for t in adapter.spec.targets}
    trained_model, trained, _ = train({**p, "adapter": adapter}, 5, learning_rate=1e-2)
    name = run(EriSaveAdapter, adapter=trained, filename_prefix=f"eri/{arch}", save_dtype="fp32")[0]
    with caplog.at_level(logging.WARNING):
        (loaded,) = LoraLoaderModelOnly().load_lora_model_only(p["model"], name, 1.0)
    assert "lora key not loaded" not in caplog.text
    expected, got = model_output(trained_model, p), model_output(loaded, p)
    assert not torch.allclose(expected, model_output(p["model"], p))
    assert (got - expected).norm() / expected.norm() <= 1e-3


def test_a_text_encoder_adapter_on_flux2_is_refused_naming_the_input(comfy_folders, tiny):
    """Flux.2's Mistral 3 encoder gets no adapter: Create adapter says so, whatever text_encoder asks for."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    p = prepared(comfy_folders, tiny, arch="flux2")
    for option in ("clip_l", "all"):
        with pytest.raises(ValueError, match=f"text_encoder {option}: Flux.2's text encoder .* set Create adapter's "
                                             f"text_encoder to none"):
            run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
                seed=0, dtype="fp32", text_encoder=option, clip=p["clip"])


def test_base_model_outputs_stay_bit_identical_through_training(p):
    before = model_output(p["model"], p)
    train(p, 3, gradient_checkpointing=True)
    assert torch.equal(before, model_output(p["model"], p))


def test_chained_and_resumed_training_equal_one_run_bit_exactly(p):
    assert_chained_and_resumed_equal_one_run(p, 8, "eri/half", batch_size=2, noise_offset=0.05, caption_dropout=0.3,
                                             gradient_checkpointing=True, schedule="cosine", warmup_steps=2,
                                             total_steps=8, loss_weighting="cosmap")


@pytest.mark.parametrize("arch", ["sd3", "flux", "zimage"])
def test_a_model_with_fp8_weights_trains_a_bf16_adapter(comfy_folders, tiny, arch):
    """ComfyUI's weight_dtype fp8_e4m3fn: weights stored in fp8 and cast per layer to bf16 for compute."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    p = prepared(comfy_folders, tiny, arch=arch)
    with torch.inference_mode(False):
        fp8 = tiny.tiny_model(arch, dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    blocks = {"sd3": "joint_blocks", "flux": "double_blocks", "zimage": "layers"}[arch]
    assert next(getattr(fp8.model.diffusion_model, blocks).parameters()).dtype == torch.float8_e4m3fn
    adapter = run(EriCreateAdapter, model=fp8, adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
                  seed=0, dtype="bf16")[0]
    fp8_p = {**p, "model": fp8, "adapter": adapter}
    before = fixed_loss(fp8, fp8_p)
    model, trained, history = train(fp8_p, 30, learning_rate=1e-2, precision="bf16", gradient_checkpointing=True)
    assert all(v.dtype == torch.bfloat16 for v in trained.weights.values())
    assert all(loss == loss for loss in history.losses)
    assert fixed_loss(model, fp8_p) < 0.95 * before


# schedule-free AdamW also moves the weights between its two points around every step: offloaded, the weights
# on the device must follow the CPU copies it steps
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_schedulefree"])
def test_optimizer_offload_trains_exactly_as_the_optimizer_on_the_device(comfy_folders, tiny, optimizer):
    p = prepared(comfy_folders, tiny, arch="flux")
    _, on_device, _ = train(p, 4, optimizer=optimizer)
    _, offloaded, history = train(p, 4, optimizer_offload=True, optimizer=optimizer)
    assert history.losses == on_device.history.losses
    assert all(torch.equal(on_device.weights[k], offloaded.weights[k]) for k in on_device.weights)
    assert all(t.device.type == "cpu" for s in offloaded.optimizer["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor))
    _, continued, _ = train(p, 2, adapter=offloaded, optimizer_offload=True, optimizer=optimizer)
    _, straight, _ = train(p, 6, optimizer=optimizer)
    assert continued.history.losses == straight.history.losses


def test_the_caption_cache_tells_text_encoders_with_the_same_weights_apart(comfy_folders, tiny):
    """SD3's CLIP-L and CLIP-G are SDXL's (same weights), but SD3 pads the context to 4096 and pools both;
    and CLIPSetLastLayer changes the output, not the weights. None of them may read another's cache."""
    from nodes import CLIPSetLastLayer
    from eridiffusion.nodes.dataset import EriCacheCaptions
    sdxl = prepared(comfy_folders, tiny, arch="sdxl")
    with torch.inference_mode(False):
        sd3_clip = tiny.tiny_clip("sd3")
    assert torch.equal(sd3_clip.cond_stage_model.clip_g.state_dict()["transformer.text_model.embeddings.token_embedding.weight"],
                       sdxl["clip"].cond_stage_model.clip_g.state_dict()["transformer.text_model.embeddings.token_embedding.weight"])
    sd3_text = run(EriCacheCaptions, dataset=sdxl["dataset"], clip=sd3_clip)[0]
    assert sd3_text.encoded == 5
    assert sd3_text.embeddings[1][1].context.shape == (77, 4096) and sd3_text.embeddings[1][1].pooled.shape == (64,)
    skipped = run(EriCacheCaptions, dataset=sdxl["dataset"],
                  clip=CLIPSetLastLayer().set_last_layer(sdxl["clip"], -3)[0])[0]
    assert skipped.encoded == 5
    assert not torch.equal(skipped.embeddings[1][1].context, sdxl["captions"].embeddings[1][1].context)


def test_latents_of_a_video_vae_are_each_images_own_as_vae_encode_gives_them(comfy_folders, tiny):
    """Wan 2.1's VAE reads a batch of images as one video's frames; Cache latents encodes each image alone."""
    from conftest import write_images
    from eridiffusion.nodes.dataset import EriCacheLatents, EriTrainingImages
    from eridiffusion.trainers.cache import _pixels
    write_images(comfy_folders["input"] / "set", ((64, 64),) * 3)
    dataset = run(EriTrainingImages, folder="set", resolution=64, trigger_word="", default_caption="", flip=False,
                  min_side=64, max_side=64, max_upscale=1.0)[0]
    vae = tiny.tiny_vae("qwen_image")
    latents = run(EriCacheLatents, dataset=dataset, vae=vae, batch_size=4)[0]
    with torch.inference_mode():
        alone = [vae.encode(_pixels(item)[None])[0] for item in dataset.items]
    assert all(torch.equal(a, b) for a, b in zip(latents.latents, alone))
    assert latents.latents[0].shape == (16, 1, 8, 8)


@pytest.mark.parametrize("gradient_checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_sd3_blocks_train_on_a_contiguous_stream_with_comfyuis_losses_bit_for_bit(comfy_folders, tiny, monkeypatch,
                                                                                  gradient_checkpointing):
    """MMDiT's PatchEmbed gives its blocks x transposed in memory; training copies it once into a contiguous tensor
    (each LayerNorm would copy it again, every step), and the losses and weights stay those of ComfyUI's layout."""
    from eridiffusion.trainers import blocks
    from eridiffusion.trainers.arch.sd3 import SD3
    p = prepared(comfy_folders, tiny, arch="sd3")
    layouts = []
    block_forward = blocks.TrainingBlockForward._forward

    def recording(self, *args, **kwargs):
        layouts.append([a.is_contiguous() for a in args if isinstance(a, torch.Tensor)])
        return block_forward(self, *args, **kwargs)
    monkeypatch.setattr(blocks.TrainingBlockForward, "_forward", recording)
    _, contiguous, _ = train(p, 3, gradient_checkpointing=gradient_checkpointing)
    assert layouts and all(all(seen) for seen in layouts)

    layouts.clear()
    monkeypatch.setattr(SD3, "contiguous_block_inputs", False)
    _, comfys_layout, _ = train(p, 3, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:     # (without, the blocks run unwrapped: nothing to record)
        assert any(not all(seen) for seen in layouts), "ComfyUI's MMDiT now gives its blocks a contiguous x"
    assert contiguous.history.losses == comfys_layout.history.losses
    assert all(torch.equal(contiguous.weights[k], comfys_layout.weights[k]) for k in contiguous.weights)
