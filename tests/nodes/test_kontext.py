"""Flux.1 Kontext edit pairs: a control image per training image (Training images' control_folder, ai-toolkit's
control_path), cached as a latent beside the target's and given to the model as ComfyUI's ReferenceLatent gives
it; the target is noised, the control is the clean reference. On tiny Flux built with ComfyUI's classes."""
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_images
from helpers import assert_chained_and_resumed_equal_one_run, prepared, run, train


def _pairs(folders, sizes=((64, 64),) * 4, control_sizes=None):
    """Training images in input/set and control images of the same names (other pixels) in input/control."""
    write_images(folders["input"] / "set", sizes)
    write_images(folders["input"] / "control", control_sizes or sizes, captions=False, seed=5)


@pytest.fixture
def p(comfy_folders, tiny):
    _pairs(comfy_folders)
    return prepared(comfy_folders, tiny, arch="flux", write=False, control_folder="control")


def _reference_conditioning(text, latent):
    """CONDITIONING as CLIPTextEncode then ComfyUI's ReferenceLatent node make it."""
    from comfy_extras.nodes_edit_model import ReferenceLatent
    cond = [[text.context.unsqueeze(0), {"pooled_output": text.pooled.unsqueeze(0)}]]
    return ReferenceLatent.execute(cond, {"samples": latent}).result[0]


def _comfy_apply(base, conditioning, x, sigma, guidance):
    """The denoised output of the stock model call, as ComfyUI's samplers build it from the conditioning."""
    params = dict(conditioning[0][1])
    params.update(cross_attn=conditioning[0][0], device="cpu", noise=x, guidance=guidance)
    conds = base.extra_conds(**params)
    conds = {k: v.process_cond(batch_size=x.shape[0], area=None, device="cpu").cond for k, v in conds.items()}
    assert "ref_latents" in conds
    return base.apply_model(x, sigma, **conds)


def _comfy_output(model_patcher, p, seed=3):
    """A MODEL's denoised output with a control image's latent as ReferenceLatent's reference (under
    inference_mode, as ComfyUI samples)."""
    import comfy.model_management
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    conditioning = _reference_conditioning(p["captions"].embeddings[1][1], p["latents"].controls[0][None])
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model_patcher])
        return _comfy_apply(model_patcher.model, conditioning, x, torch.tensor([0.3, 0.8]), 1.0).clone()


def test_the_model_gets_the_reference_latent_as_comfyuis_reference_latent_conditioning_gives_it(tiny):
    from eridiffusion.trainers.arch import Batch, detect
    from eridiffusion.trainers.cache import TextEmbedding
    from eridiffusion.trainers.config import TrainingSettings
    model = tiny.tiny_model("flux")
    base, ms = model.model, model.model.model_sampling
    gen = torch.Generator().manual_seed(5)
    text = TextEmbedding(torch.randn(7, 64, generator=gen), torch.randn(32, generator=gen))
    x, control = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    settings = TrainingSettings(flux_guidance=2.5)
    paired = Batch(x, [text, text], [None, None], controls=base.latent_format.process_in(control).repeat(2, 1, 1, 1))
    with torch.no_grad():
        ours = detect(model).predict(base, ms, x, sigma, paired, settings)
        comfy_denoised = _comfy_apply(base, _reference_conditioning(text, control), x, sigma, 2.5)
        without = detect(model).predict(base, ms, x, sigma, Batch(x, [text, text], [None, None]), settings)
    torch.testing.assert_close(ms.calculate_denoised(sigma.view(-1, 1, 1, 1), ours, x), comfy_denoised)
    assert not torch.allclose(ours, without)     # the reference is seen


def test_control_images_are_cached_beside_the_latents_fitted_to_their_training_images_bucket(comfy_folders, tiny):
    from eridiffusion.nodes.dataset import EriCacheLatents
    write_images(comfy_folders["input"] / "set", ((64, 64), (128, 64)))
    (comfy_folders["input"] / "control").mkdir()
    shutil.copy(comfy_folders["input"] / "set" / "img0.png", comfy_folders["input"] / "control" / "img0.png")
    # another size and format than its training image: stretched to it, then fitted to its bucket
    Image.new("RGB", (40, 90), (200, 30, 30)).save(comfy_folders["input"] / "control" / "img1.jpg")
    p = prepared(comfy_folders, tiny, arch="flux", write=False, control_folder="control")
    latents = p["latents"]
    assert len(latents.controls) == 2 and latents.encoded == 4
    for latent, control in zip(latents.latents, latents.controls):
        assert control.shape == latent.shape
    # the same image as control encodes to the same latent: the pair is aligned pixel for pixel
    same = [i for i, item in enumerate(latents.dataset.items) if item.path.endswith("img0.png")][0]
    assert torch.equal(latents.controls[same], latents.latents[same])
    again = run(EriCacheLatents, dataset=p["dataset"], vae=p["vae"], batch_size=4)[0]
    assert again.encoded == 0 and all(torch.equal(a, b) for a, b in zip(again.controls, latents.controls))


def test_one_result_of_two_different_control_images_is_two_edit_pairs_not_a_duplicate(comfy_folders):
    from eridiffusion.nodes.dataset import EriTrainingImages
    _pairs(comfy_folders, ((64, 64),) * 3)
    shutil.copy(comfy_folders["input"] / "set" / "img0.png", comfy_folders["input"] / "set" / "img1.png")
    shutil.copy(comfy_folders["input"] / "control" / "img0.png", comfy_folders["input"] / "control" / "img2.png")
    shutil.copy(comfy_folders["input"] / "set" / "img0.png", comfy_folders["input"] / "set" / "img2.png")
    dataset = run(EriTrainingImages, folder="set", resolution=64, trigger_word="", default_caption="", flip=False,
                  min_side=64, max_side=64, max_upscale=1.0, control_folder="control")[0]
    # img0 and img1: the same result of two control images; img2 repeats img0's pair and is left out
    assert sorted(Path(i.path).name for i in dataset.items) == ["img0.png", "img1.png"]
    assert [Path(a).name for a, _ in dataset.duplicates] == ["img2.png"]


def assert_training_feeds_each_images_control_latent(p, monkeypatch, shape):
    """Two training steps give the diffusion model one reference each (`ref_latents`, of `shape`): a control
    latent of p's, scaled as the latent format scales it."""
    dm = p["model"].model.diffusion_model
    seen = []
    forward = dm.forward
    monkeypatch.setattr(dm, "forward", lambda *a, **kw: seen.append(kw.get("ref_latents")) or forward(*a, **kw))
    train(p, 2)
    base = p["model"].model
    expected = [base.latent_format.process_in(c[None]) for c in p["latents"].controls]
    assert len(seen) == 2
    for refs in seen:
        assert isinstance(refs, list) and len(refs) == 1 and refs[0].shape == shape
        assert any(torch.equal(refs[0], e) for e in expected)


def test_training_feeds_each_images_control_latent_as_the_reference(p, monkeypatch):
    assert_training_feeds_each_images_control_latent(p, monkeypatch, (1, 16, 8, 8))


def assert_edit_pair_gradients_match_finite_differences(comfy_folders, tiny, monkeypatch, arch):
    """fp64 adapter gradients of `arch` trained on edit pairs (a reference latent per image) equal central finite
    differences (test_gradients.py)."""
    from test_gradients import assert_reference_gradients_match_finite_differences, rotary_table_in_fp64
    rotary_table_in_fp64(monkeypatch)
    _pairs(comfy_folders, ((64, 64),) * 2)
    p = prepared(comfy_folders, tiny, arch=arch, write=False, control_folder="control")
    assert_reference_gradients_match_finite_differences(p, tiny, arch)


def test_fp64_adapter_gradients_with_a_reference_latent_match_central_finite_differences(comfy_folders, tiny,
                                                                                          monkeypatch):
    assert_edit_pair_gradients_match_finite_differences(comfy_folders, tiny, monkeypatch, "flux")


def _stock_nodes(monkeypatch):
    """ComfyUI's own nodes.py (the pack's nodes/ folder shadows it where the repository root is on sys.path)."""
    import importlib
    from comfy_env import comfyui_dir
    monkeypatch.syspath_prepend(str(comfyui_dir()))
    return importlib.import_module("nodes")


def assert_the_stock_lora_loader_gives_the_train_nodes_output(p, caplog, monkeypatch, prefix, output_of):
    """Five training steps, saved; LoraLoaderModelOnly's MODEL gives the Train node's output (`output_of(MODEL)`,
    under inference_mode), which differs from the base model's."""
    from eridiffusion.nodes.adapter import EriSaveAdapter
    trained_model, adapter, _ = train(p, 5, learning_rate=1e-2)
    loader = _stock_nodes(monkeypatch).LoraLoaderModelOnly()
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix=prefix, save_dtype="fp32")[0]
    with caplog.at_level(logging.WARNING):
        loaded = loader.load_lora_model_only(p["model"], name, 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    outputs = {which: output_of(m) for which, m in (("trained", trained_model), ("stock", loaded),
                                                     ("base", p["model"]))}
    assert not torch.allclose(outputs["trained"], outputs["base"])
    assert (outputs["stock"] - outputs["trained"]).norm() / outputs["trained"].norm() <= 1e-3


def test_the_stock_lora_loader_gives_the_train_nodes_output_with_a_reference(p, caplog, monkeypatch):
    assert_the_stock_lora_loader_gives_the_train_nodes_output(p, caplog, monkeypatch, "eri/kontext",
                                                              lambda m: _comfy_output(m, p))


def test_chained_and_resumed_training_with_control_images_equal_one_run_bit_exactly(p):
    assert_chained_and_resumed_equal_one_run(p, 6, "eri/kontext_half", batch_size=2, noise_offset=0.05,
                                             caption_dropout=0.3, gradient_checkpointing=True, schedule="cosine",
                                             warmup_steps=2, total_steps=6)


def test_queue_refuses_a_bad_control_folder_naming_it(comfy_folders):
    from eridiffusion.nodes.dataset import EriTrainingImages
    _pairs(comfy_folders, ((64, 64),) * 3)
    (comfy_folders["input"] / "control" / "img2.png").unlink()
    (comfy_folders["input"] / "control" / "img2.webp").write_bytes(b"")     # any image extension pairs by name
    check = lambda name, folder="set": EriTrainingImages.validate_inputs(folder=folder,  # noqa: E731
                                                                          control_folder=name)
    assert check("control") is True and check("") is True
    (comfy_folders["input"] / "control" / "img1.png").unlink()
    problem = check("control")
    assert "control_folder 'control' has no control image for 1 training image(s)" in problem
    assert "'img1.png'" in problem and "'img0.png'" not in problem
    assert "control_folder 'nothing_here' does not exist" in check("nothing_here")
    assert "points outside" in check("../elsewhere")
    assert "is the training folder itself" in check("set")
    assert "control_folder must be a folder name" in check(7)


def test_an_architecture_without_reference_latents_refuses_control_images(comfy_folders, tiny):
    from eridiffusion.trainers.config import ConfigError
    _pairs(comfy_folders, ((64, 64),) * 2)
    p = prepared(comfy_folders, tiny, arch="sd3", write=False, control_folder="control")
    with pytest.raises(ConfigError, match="control images .* but the MODEL is sd3: load Flux Kontext or "
                                          "Qwen-Image-Edit, or clear control_folder"):
        train(p, 1)


def test_a_yaml_jobs_control_path_is_checked_at_queue_and_gives_the_dataset_its_control_images(comfy_folders, tiny):
    from eridiffusion.nodes.job import EriLoadTrainingJob
    _pairs(comfy_folders, ((64, 64),) * 2)
    job = ("job: extension\nconfig:\n  name: kontext\n  process:\n    - type: sd_trainer\n"
           "      network: {type: lora, linear: 4, linear_alpha: 4}\n"
           "      model: {name_or_path: kontext.safetensors, arch: flux_kontext}\n"
           "      datasets: [{folder_path: set, control_path: CONTROL, resolution: [64]}]\n"
           "      train: {steps: 2, lr: 1e-3}\n")
    assert EriLoadTrainingJob.validate_inputs(job.replace("CONTROL", "control")) is True
    problem = EriLoadTrainingJob.validate_inputs(job.replace("CONTROL", "missing"))
    assert "datasets[0].control_path 'missing' does not exist in ComfyUI's input folder" in problem
    with torch.inference_mode(False):
        model = tiny.tiny_model("flux")
    dataset = run(EriLoadTrainingJob, model=model, job=job.replace("CONTROL", "control"))[0]
    assert sorted(Path(i.control).name for i in dataset.items) == ["img0.png", "img1.png"]


def test_samples_during_training_take_a_reference_through_sampling_settings_positive_input(p):
    """Sampling settings' positive CONDITIONING may carry ReferenceLatent's reference: samples are then taken as a
    stock Kontext graph samples (the reference changes the image)."""
    from eridiffusion.nodes.sample import EriSamplingSettings
    from eridiffusion.nodes.train import EriTrainSteps
    from helpers import settings
    text = p["captions"].embeddings[1][1]
    plain = [[text.context.unsqueeze(0), {"pooled_output": text.pooled.unsqueeze(0)}]]
    images = []
    for positive in (plain, _reference_conditioning(text, p["latents"].controls[0][None])):
        sampling = run(EriSamplingSettings, vae=p["vae"], prompts="", negative_prompt="", every_n_steps=100, seed=5,
                       seed_mode="fixed", width=64, height=64, sampler_name="euler", scheduler="normal", steps=2,
                       cfg=1.0, guidance=2.5, filename_prefix="eri_samples/kontext", positive=positive)[0]
        images.append(run(EriTrainSteps, model=p["model"], adapter=p["adapter"], latents=p["latents"],
                          captions=p["captions"], settings=settings(), steps=1, sampling=sampling)[3])
    assert images[0].shape == images[1].shape == (1, 64, 64, 3)
    assert not torch.allclose(images[0], images[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
                    reason="CUDA graphs need a GPU (ERI_TEST_DEVICE=cuda)")
def test_graphed_kontext_training_equals_eager_training(comfy_folders, tiny, monkeypatch):
    """The reference latent is one more tensor of the captured micro-batch: replays give eager training's numbers."""
    from test_cuda_graphs import SIZES, assert_same_training, train_node
    from eridiffusion.trainers.graphs import GraphedMicroBatches
    made, original = [], GraphedMicroBatches._capture

    def capture(self, inputs):     # every capture has the reference among its inputs, and succeeds
        entry = original(self, inputs)
        made.append("cond.ref_latent" in inputs and entry is not None)
        return entry
    monkeypatch.setattr(GraphedMicroBatches, "_capture", capture)
    _pairs(comfy_folders, SIZES)
    p = prepared(comfy_folders, tiny, arch="flux", write=False, control_folder="control")
    eager = train_node(p, 12, compile="off")
    graphed = train_node(p, 12, compile="cuda_graphs")
    assert made and all(made), made
    assert_same_training(graphed, eager)
