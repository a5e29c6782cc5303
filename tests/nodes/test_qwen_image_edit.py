"""Qwen-Image-Edit edit pairs: ComfyUI loads Qwen-Image-Edit as Qwen-Image, so training recognises it by its data (a
control image per training image: control_folder, ai-toolkit's control_path). The control image's latent goes in as
TextEncodeQwenImageEdit's reference latent, and each caption is encoded with the control image as that node encodes
a prompt with its image. On tiny Qwen-Image built with ComfyUI's classes."""
from pathlib import Path

import pytest
import torch

from helpers import assert_chained_and_resumed_equal_one_run, prepared, run, train
from test_kontext import (_comfy_apply, _pairs, assert_the_stock_lora_loader_gives_the_train_nodes_output,
                          assert_training_feeds_each_images_control_latent)


@pytest.fixture
def p(comfy_folders, tiny):
    _pairs(comfy_folders)
    return prepared(comfy_folders, tiny, arch="qwen_image", write=False, control_folder="control")


def _edit_conditioning(clip, vae, caption, image):
    """CONDITIONING as ComfyUI's TextEncodeQwenImageEdit makes it of a prompt and an IMAGE (with the VAE: the
    reference latent too)."""
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit
    return TextEncodeQwenImageEdit.execute(clip, caption, vae=vae, image=image).result[0]


def _control_image(item):
    from eridiffusion.trainers.cache import _control_pixels
    return _control_pixels(item)[None]


@pytest.mark.parametrize("node", ["TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus"])
def test_captions_are_cached_with_their_control_image_as_the_chosen_comfyui_node_encodes_them(comfy_folders, tiny,
                                                                                              node):
    """The control image as its reference latent is made (fitted to its training image's bucket) is what the
    text encoder sees, through the node's own scaling and template (Training images' control_prompt)."""
    import comfy_extras.nodes_qwen as nodes_qwen
    from eridiffusion.nodes.dataset import EriCacheCaptions
    _pairs(comfy_folders)
    p = prepared(comfy_folders, tiny, arch="qwen_image", write=False, control_folder="control", control_prompt=node)
    text, latents = p["captions"], p["latents"]
    assert text.with_images

    def encoded(caption, item, which=node):
        image = {"image1" if which.endswith("Plus") else "image": _control_image(item)}
        return getattr(nodes_qwen, which).execute(p["clip"], caption, **image).result[0][0][0][0].float()
    for item in latents.dataset.items:
        torch.testing.assert_close(text.get(item.caption, item).context, encoded(item.caption, item))
        # the empty caption (caption dropout) with the image too
        torch.testing.assert_close(text.get("", item).context, encoded("", item))
    items = latents.dataset.items
    assert not torch.equal(text.get("", items[0]).context, text.get("", items[1]).context), \
        "each control image is seen"
    other = next(n for n in ("TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus") if n != node)
    assert text.get("", items[0]).context.shape != encoded("", items[0], other).shape, "the node's own encoding"
    again = run(EriCacheCaptions, dataset=p["dataset"], clip=p["clip"])[0]
    assert again.encoded == 0 and [n for n, _ in again.embeddings] == [n for n, _ in text.embeddings]
    assert all(torch.equal(a.context, b.context) for (_, a), (_, b) in zip(again.embeddings, text.embeddings))


def test_the_model_gets_the_reference_latent_as_text_encode_qwen_image_edit_gives_it(p):
    from eridiffusion.trainers.arch import Batch, detect
    from eridiffusion.trainers.config import TrainingSettings
    model = p["model"]
    base, ms = model.model, model.model.model_sampling
    item = p["latents"].dataset.items[0]
    conditioning = _edit_conditioning(p["clip"], None, item.caption, _control_image(item))
    conditioning = [[c, {**o, "reference_latents": [p["latents"].controls[0][None]]}] for c, o in conditioning]
    text = p["captions"].get(item.caption, item)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    control = base.latent_format.process_in(p["latents"].controls[0][None]).repeat(2, 1, 1, 1, 1)
    arch = detect(model)
    with torch.no_grad():
        ours = arch.predict(base, ms, x, sigma, Batch(x, [text, text], [None, None], controls=control),
                            TrainingSettings())
        comfy_denoised = _comfy_apply(base, conditioning, x.unsqueeze(2), sigma, None).squeeze(2)
        without = arch.predict(base, ms, x, sigma, Batch(x, [text, text], [None, None]), TrainingSettings())
    torch.testing.assert_close(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), ours, x), comfy_denoised)
    assert not torch.allclose(ours, without)     # the reference is seen


def test_training_feeds_each_images_control_latent_as_the_reference(p, monkeypatch):
    assert_training_feeds_each_images_control_latent(p, monkeypatch, (1, 16, 1, 8, 8))     # a Wan latent's frame


def test_fp64_adapter_gradients_with_a_reference_latent_match_central_finite_differences(comfy_folders, tiny,
                                                                                          monkeypatch):
    from test_kontext import assert_edit_pair_gradients_match_finite_differences
    assert_edit_pair_gradients_match_finite_differences(comfy_folders, tiny, monkeypatch, "qwen_image")


def test_the_stock_lora_loader_gives_the_train_nodes_output_with_text_encode_qwen_image_edits_conditioning(
        p, caplog, monkeypatch):
    import comfy.model_management
    item = p["latents"].dataset.items[0]
    conditioning = _edit_conditioning(p["clip"], p["vae"], item.caption, _control_image(item))   # a 1024² reference
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def output_of(model_patcher):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model_patcher])
            return _comfy_apply(model_patcher.model, conditioning, x, torch.tensor([0.3, 0.8]), None).clone()
    assert_the_stock_lora_loader_gives_the_train_nodes_output(p, caplog, monkeypatch, "eri/qwen_edit", output_of)


def test_chained_and_resumed_training_with_control_images_equal_one_run_bit_exactly(p):
    assert_chained_and_resumed_equal_one_run(p, 6, "eri/qwen_edit_half", batch_size=2, noise_offset=0.05,
                                             caption_dropout=0.3, gradient_checkpointing=True, schedule="cosine",
                                             warmup_steps=2, total_steps=6)


def test_a_yaml_jobs_qwen_image_edit_arch_and_control_path_give_the_dataset_its_control_images(comfy_folders,
                                                                                                 tiny):
    from eridiffusion.nodes.job import EriLoadTrainingJob
    _pairs(comfy_folders, ((64, 64),) * 2)
    job = ("job: extension\nconfig:\n  name: qwen_edit\n  process:\n    - type: sd_trainer\n"
           "      network: {type: lora, linear: 4, linear_alpha: 4}\n"
           "      model: {name_or_path: qwen_image_edit.safetensors, arch: qwen_image_edit}\n"
           "      datasets: [{folder_path: set, control_path: control, resolution: [64]}]\n"
           "      train: {steps: 2, lr: 1e-3}\n")
    assert EriLoadTrainingJob.validate_inputs(job) is True
    with torch.inference_mode(False):
        model = tiny.tiny_model("qwen_image")
    dataset = run(EriLoadTrainingJob, model=model, job=job)[0]
    assert sorted(Path(i.control).name for i in dataset.items) == ["img0.png", "img1.png"]
    from eridiffusion.trainers.config import ConfigError
    from eridiffusion.trainers.job import parse_job
    assert parse_job(job).model.arch == "qwen_image"     # ComfyUI loads Qwen-Image-Edit as Qwen-Image
    assert parse_job(job).datasets[0].configs[0].control_prompt == "TextEncodeQwenImageEdit"
    plus = parse_job(job.replace("arch: qwen_image_edit", "arch: qwen_image_edit_plus"))
    assert plus.model.arch == "qwen_image" and plus.datasets[0].configs[0].control_prompt == \
        "TextEncodeQwenImageEditPlus"
    with pytest.raises(ConfigError,
                       match=r"arch must be one of .*qwen_image \(or qwen_image_edit, qwen_image_edit_plus\)"):
        parse_job(job.replace("arch: qwen_image_edit", "arch: qwen_image_edit_9000"))
