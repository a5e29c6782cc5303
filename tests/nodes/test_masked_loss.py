"""Masked loss (kohya masked_loss, ai-toolkit alpha_mask / mask_path): per-pixel loss weights from an image's alpha or
a mask image, cached at the latent's size beside the latents and applied as the mean of loss x mask."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import prepared, run, settings, train


def add_alpha(folder, opaque_columns=None):
    """Give every PNG of `folder` an alpha channel: opaque in its left `opaque_columns` pixels (all if None),
    transparent to the right."""
    for path in sorted(folder.glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        if opaque_columns is not None:
            alpha[:, opaque_columns:] = 0
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


def dataset_with(comfy_folders, tiny, arch="sdxl", opaque_columns=None, **dataset_kw):
    """prepared() over four RGBA images."""
    from conftest import write_images
    write_images(comfy_folders["input"] / "set", ((64, 64),) * 4)
    add_alpha(comfy_folders["input"] / "set", opaque_columns)
    return prepared(comfy_folders, tiny, arch=arch, write=False, **dataset_kw)


def test_the_alpha_mask_is_cached_at_the_latents_size_and_mirrored_with_its_image(comfy_folders, tiny):
    p = dataset_with(comfy_folders, tiny, opaque_columns=32, masked_loss="alpha", flip=True)
    latents = p["latents"]
    assert len(latents.masks) == len(latents.latents) == 8
    for item, latent, mask in zip(latents.dataset.items, latents.latents, latents.masks):
        assert mask.shape == latent.shape[-2:] == (8, 8)
        trained, ignored = (mask[:, 4:], mask[:, :4]) if item.flip else (mask[:, :4], mask[:, 4:])
        assert torch.all(trained == 1.0) and torch.all(ignored == 0.0), item.flip


def test_without_masked_loss_an_images_alpha_is_only_flattened_onto_white(comfy_folders, tiny):
    p = dataset_with(comfy_folders, tiny, opaque_columns=32)
    assert p["latents"].masks == () and all(not item.mask for item in p["dataset"].items)


def test_mask_min_value_is_the_lowest_weight(comfy_folders, tiny):
    p = dataset_with(comfy_folders, tiny, opaque_columns=32, masked_loss="alpha", mask_min_value=0.25)
    assert all(float(m.min()) == 0.25 and float(m.max()) == 1.0 for m in p["latents"].masks)


def masked_pixel_perturbed(inputs, where, size=0.5):
    """The inputs with x0 and noise changed at the latent pixels `where` (a (h, w) bool map) so that the noisy
    latent stays the same and the flow target (noise - x0) changes by -size."""
    sigma = inputs["sigma"].view(-1, 1, 1, 1)
    changed = dict(inputs)
    delta = size * where.to(inputs["x0"].dtype)
    changed["x0"] = inputs["x0"] + sigma * delta
    changed["noise"] = inputs["noise"] - (1 - sigma) * delta
    return changed


def test_a_latent_pixel_with_mask_0_gives_no_gradient(comfy_folders, tiny):
    """Perturbing the target at a masked pixel (with the model's input unchanged) leaves the adapter's gradient as
    it was; the same perturbation at a trained pixel changes it."""
    from eridiffusion.trainers.loop import TrainingRun
    p = dataset_with(comfy_folders, tiny, arch="sd3", opaque_columns=32, masked_loss="alpha")
    with torch.inference_mode(False):
        run_ = TrainingRun(p["model"], p["adapter"], p["latents"], p["captions"],
                           settings(optimizer="adamw", compile="off"), end_step=1)
        inputs = run_._micro_batch()
        assert torch.all(inputs["mask"][..., :4] == 1) and torch.all(inputs["mask"][..., 4:] == 0)
        _, before = run_._loss_and_gradients(inputs)
        masked, trained = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
        masked[:, 5:], trained[:, :3] = True, True
        _, after_masked = run_._loss_and_gradients(masked_pixel_perturbed(inputs, masked))
        _, after_trained = run_._loss_and_gradients(masked_pixel_perturbed(inputs, trained))
    change = lambda grads: max(float((a - b).abs().max()) for a, b in zip(grads, before))  # noqa: E731
    scale = max(float(g.abs().max()) for g in before)
    assert change(after_trained) > 1e-3 * scale, "the perturbation reaches the loss where the mask is 1"
    assert change(after_masked) <= 1e-6 * scale, "where the mask is 0 it reaches nothing"


@pytest.mark.parametrize("masked_loss", ["alpha", "mask_folder"])
def test_an_all_ones_mask_trains_exactly_as_no_mask(comfy_folders, tiny, masked_loss):
    mask_dir = comfy_folders["input"] / "masks"
    mask_dir.mkdir()
    for i in range(4):
        Image.new("L", (64, 64), 255).save(mask_dir / f"img{i}.png")
    p = dataset_with(comfy_folders, tiny, opaque_columns=None, masked_loss=masked_loss, mask_folder="masks")
    assert len(p["latents"].masks) == 4
    plain = dict(p, latents=p["latents"].__class__(p["dataset"], p["latents"].latents, p["latents"].vae_id, 0))
    _, masked_state, _ = train(p, 4)
    _, plain_state, _ = train(plain, 4)
    assert masked_state.history.losses == plain_state.history.losses
    assert all(torch.equal(masked_state.weights[k], plain_state.weights[k]) for k in plain_state.weights)


def test_a_changed_mask_file_is_made_again_and_the_latents_are_not(comfy_folders, tiny):
    from eridiffusion.nodes.dataset import EriCacheLatents, EriTrainingImages
    mask_dir = comfy_folders["input"] / "masks"
    mask_dir.mkdir()
    for i in range(4):
        Image.new("L", (64, 64), 255).save(mask_dir / f"img{i}.png")
    p = dataset_with(comfy_folders, tiny, masked_loss="mask_folder", mask_folder="masks")
    half = np.full((64, 64), 255, np.uint8)
    half[:, 32:] = 0
    Image.fromarray(half).save(mask_dir / "img2.png")
    kw = dict(folder="set", resolution=64, trigger_word="", default_caption="", flip=False, min_side=64, max_side=128,
              max_upscale=1.0, masked_loss="mask_folder", mask_folder="masks")
    assert EriTrainingImages.fingerprint_inputs(**kw) != EriTrainingImages.fingerprint_inputs(
        **dict(kw, mask_folder="set")), "the mask folder's listing is part of the fingerprint"
    dataset = run(EriTrainingImages, **kw)[0]
    latents = run(EriCacheLatents, dataset=dataset, vae=p["vae"], batch_size=4)[0]
    assert latents.encoded == 0
    index = [i for i, item in enumerate(dataset.items) if item.path.endswith("img2.png")][0]
    assert torch.all(latents.masks[index][:, 4:] == 0) and torch.all(latents.masks[index][:, :4] == 1)
    assert all(torch.all(m == 1) for i, m in enumerate(latents.masks) if i != index)


def test_resume_is_bit_exact_with_masked_loss(comfy_folders, tiny):
    from eridiffusion.nodes.adapter import EriLoadAdapter, EriSaveAdapter
    p = dataset_with(comfy_folders, tiny, opaque_columns=40, masked_loss="alpha", mask_min_value=0.1)
    _, straight, _ = train(p, 6)
    _, first, _ = train(p, 3)
    name = run(EriSaveAdapter, adapter=first, filename_prefix="masked", save_dtype="fp16")[0]
    _, second, _ = train(p, 3, adapter=run(EriLoadAdapter, lora_name=name)[0])
    assert second.history.losses == straight.history.losses
    assert all(torch.equal(straight.weights[k], second.weights[k]) for k in straight.weights)


def test_an_image_without_a_mask_in_the_mask_folder_is_named(comfy_folders, tiny):
    from conftest import write_images
    from eridiffusion.nodes.dataset import EriTrainingImages
    from eridiffusion.trainers.config import ConfigError
    write_images(comfy_folders["input"] / "set", ((64, 64),) * 2)
    (comfy_folders["input"] / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(comfy_folders["input"] / "masks" / "img0.jpg")
    kw = dict(folder="set", resolution=64, trigger_word="", default_caption="", flip=False, min_side=64, max_side=128,
              max_upscale=1.0, masked_loss="mask_folder", mask_folder="masks")
    with pytest.raises(ConfigError, match="image 'img1.png' has no mask in mask_folder 'masks'"):
        run(EriTrainingImages, **kw)
    check = lambda folder: EriTrainingImages.validate_inputs(folder="set", masked_loss="mask_folder",  # noqa: E731
                                                             mask_folder=folder)
    assert check("masks") is True
    assert "points outside" in check("../elsewhere") and "mask_folder" in check("nothing_here")
    assert "masked_loss must be one of off, alpha, mask_folder" in EriTrainingImages.validate_inputs(
        folder="set", masked_loss="depth")
    assert "mask_folder must be a folder name" in EriTrainingImages.validate_inputs(
        folder="set", masked_loss="mask_folder", mask_folder=7)
