"""Load training job (YAML): a job file becomes the objects of the other nodes, and training them is training
the same graph wired by hand."""
import pytest
import torch

from helpers import prepared, run, settings
from eridiffusion.trainers.config import ConfigError

JOB = """
job: extension
config:
  name: tiny_job
  process:
    - type: sd_trainer
      trigger_word: ohwx
      network: {type: lora, linear: 4, linear_alpha: 2}
      datasets:
        - {folder_path: set, caption_ext: txt, resolution: [64], caption_dropout_rate: 0.25}
      train: {batch_size: 2, steps: 3, lr: 1e-3, optimizer: adamw, dtype: fp32, gradient_checkpointing: false,
              noise_offset: 0.05, max_grad_norm: 1.0, weight_decay: 0.0}
      save: {dtype: float16, save_every: 2}
      sample: {sample_every: 2, prompts: ["[trigger] in a field"], guidance_scale: 3, sample_steps: 2,
               width: 64, height: 64, sampler: flowmatch, seed: 5}
"""


@pytest.fixture
def p(comfy_folders, tiny):
    return prepared(comfy_folders, tiny, arch="sd3")


def load(p, job=JOB, **kw):
    from eridiffusion.nodes.job import EriLoadTrainingJob
    return run(EriLoadTrainingJob, model=p["model"], job=job, **kw)


def test_every_input_has_a_tooltip_and_the_default_job_parses():
    from eridiffusion.nodes.job import DEFAULT_JOB, EriLoadTrainingJob
    from eridiffusion.trainers.job import parse_job
    schema = EriLoadTrainingJob.define_schema()
    assert schema.node_id == "EriLoadTrainingJob" and schema.category == "EriDiffusion/job"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    job = parse_job(DEFAULT_JOB)
    assert job.datasets[0].folder_path == "training_images" and job.sample.prompts == ("a photo of ohwx",)


def test_a_job_trains_exactly_as_the_same_graph_wired_by_hand(p, comfy_folders):
    from eridiffusion.nodes.adapter import EriSaveAdapter
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents
    from eridiffusion.nodes.train import EriTrainSteps
    (comfy_folders["input"] / "jobs").mkdir()
    (comfy_folders["input"] / "jobs" / "tiny.yaml").write_text(JOB)
    dataset, adapter, job_settings, steps, prefix, sampling = load(
        p, job="jobs/tiny.yaml", clip=p["clip"], vae=p["vae"])
    assert (steps, prefix) == (3, "tiny_job/tiny_job")
    assert {i.caption for i in dataset.items} == {f"ohwx, a photo of pattern {i}" for i in range(4)}
    assert (adapter.spec.kind, adapter.spec.rank, adapter.spec.alpha, adapter.spec.arch) == ("lora", 4, 2.0, "sd3")
    assert (sampling.every_n_steps, sampling.cfg, sampling.steps, sampling.seed, sampling.sampler_name) == \
        (2, 3.0, 2, 5, "euler")
    assert [label for label, _ in sampling.positives] == ["ohwx in a field"]

    latents = run(EriCacheLatents, dataset=dataset, vae=p["vae"], batch_size=4)[0]
    captions = run(EriCacheCaptions, dataset=dataset, clip=p["clip"])[0]
    _, from_job, _, samples, _ = run(EriTrainSteps, model=p["model"], adapter=adapter, latents=latents,
                                  captions=captions, settings=job_settings, steps=steps, sampling=sampling)
    assert samples.shape[0] == 2                       # after step 2 and after the last step

    # the job leaves timestep_type out: ai-toolkit's default, sigmoid timesteps without the model's shift
    assert_trained_as_by_hand(from_job, p, latents, captions, timestep_sampling="sigmoid", timestep_shift=1.0)
    name = run(EriSaveAdapter, adapter=from_job, filename_prefix=prefix, save_dtype="fp16")[0]
    assert name == "tiny_job/tiny_job_000003.safetensors" and (comfy_folders["loras"] / name).is_file()


def assert_trained_as_by_hand(from_job, p, latents, captions, **timesteps):
    """The JOB's adapter, trained 3 steps, equals one made and trained with its settings wired by hand."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.nodes.train import EriTrainSteps
    by_hand = settings(learning_rate=1e-3, batch_size=2, noise_offset=0.05, caption_dropout=0.25, **timesteps)
    adapter_by_hand = run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=2.0,
                          target="attention_mlp", seed=0, dtype="fp32")[0]
    _, wired, _, _, _ = run(EriTrainSteps, model=p["model"], adapter=adapter_by_hand, latents=latents,
                            captions=captions, settings=by_hand, steps=3)
    assert from_job.history.losses == wired.history.losses
    assert all(torch.equal(from_job.weights[k], wired.weights[k]) for k in wired.weights)


def test_a_zimage_job_trains_a_zimage_model_as_the_graph_wired_by_hand(comfy_folders, tiny):
    """model.arch zimage (ai-toolkit's name) with timestep_type shift: Z-Image's own shift 3.0, and its
    guidance_scale as the samples' CFG scale."""
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents
    from eridiffusion.nodes.train import EriTrainSteps
    z = prepared(comfy_folders, tiny, arch="zimage")
    job = JOB.replace("type: sd_trainer", "type: sd_trainer\n      model: {arch: zimage}").replace(
        "weight_decay: 0.0}", "weight_decay: 0.0, timestep_type: shift}")
    dataset, adapter, job_settings, steps, _, sampling = load(z, job=job, clip=z["clip"], vae=z["vae"])
    assert adapter.spec.arch == "zimage" and sampling.cfg == 3.0
    assert (job_settings.timestep_sampling, job_settings.timestep_shift) == ("uniform", 3.0)
    latents = run(EriCacheLatents, dataset=dataset, vae=z["vae"], batch_size=4)[0]
    captions = run(EriCacheCaptions, dataset=dataset, clip=z["clip"])[0]
    _, from_job, _, _, _ = run(EriTrainSteps, model=z["model"], adapter=adapter, latents=latents,
                               captions=captions, settings=job_settings, steps=steps)
    assert_trained_as_by_hand(from_job, z, latents, captions, timestep_sampling="uniform", timestep_shift=3.0)


def test_without_clip_and_vae_there_is_no_sampling_and_the_rest_works(p):
    dataset, adapter, _, _, _, sampling = load(p)
    assert sampling is None and len(dataset.items) == 4 and adapter.step == 0


def test_folders_stay_inside_the_input_folder_and_the_architecture_must_match(p, tmp_path):
    from eridiffusion.nodes.paths import PathError
    with pytest.raises(PathError, match=r"datasets\[0\].folder_path '/etc' points outside"):
        load(p, job=JOB.replace("folder_path: set", "folder_path: /etc"))
    with pytest.raises(PathError, match="job '../job.yaml' points outside"):
        load(p, job="../job.yaml")
    with pytest.raises(ConfigError, match="model.arch says flux but the MODEL is sd3"):
        load(p, job=JOB.replace("type: sd_trainer", "type: sd_trainer\n      model: {arch: flux}"))
    with pytest.raises(ConfigError, match="does not exist in ComfyUI's input folder"):
        load(p, job="missing.yaml")


def test_is_v_pred_needs_a_v_prediction_model_on_the_canvas_and_headless_patches_it_as_comfyui_does(
        comfy_folders, tiny):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from eridiffusion.nodes.job import EriLoadTrainingJob
    from eridiffusion.trainers.arch.sdxl import predicts_v, v_prediction_model
    from helpers import train
    p = prepared(comfy_folders, tiny, arch="sdxl")
    job = JOB.replace("type: sd_trainer", "type: sd_trainer\n      model: {is_xl: true, is_v_pred: true}") \
        .replace("sampler: flowmatch", "sampler: euler")
    with pytest.raises(ConfigError, match="is_v_pred is true but the MODEL predicts noise.*ModelSamplingDiscrete"):
        run(EriLoadTrainingJob, model=p["model"], job=job)
    # what headless does to the loaded model is what the canvas's ModelSamplingDiscrete v_prediction does
    ours = v_prediction_model(p["model"])
    (stock,) = ModelSamplingDiscrete().patch(p["model"], "v_prediction", False)
    assert predicts_v(ours) and not predicts_v(p["model"]) and v_prediction_model(ours) is ours
    assert run(EriLoadTrainingJob, model=ours, job=job)[2].learning_rate == 1e-3
    _, a, _ = train(dict(p, model=ours), 3)
    _, b, _ = train(dict(p, model=stock), 3)
    _, eps, _ = train(p, 3)
    assert a.history.losses == b.history.losses != eps.history.losses


def test_headless_loads_an_is_v_pred_job_as_a_v_prediction_model(comfy_folders, tiny, tmp_path, monkeypatch):
    import comfy.sd
    from eridiffusion import headless
    from eridiffusion.trainers.arch.sdxl import predicts_v
    from eridiffusion.trainers.job import parse_job
    checkpoint = tmp_path / "sdxl.ckpt"
    checkpoint.write_bytes(b"")
    with torch.inference_mode(False):
        loaded = tiny.tiny_model("sdxl"), tiny.tiny_clip("sdxl"), tiny.tiny_vae("sdxl")
    # the tiny SDXL is not detected from a file (comfyui-testing.md): the loader hands it over instead
    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", lambda *a, **k: (*loaded, None))
    text = (f"config:\n  name: x\n  process:\n    - network: {{type: lora}}\n"
            f"      model: {{name_or_path: '{checkpoint}', is_xl: true%s}}\n")
    model, _, _ = headless.load_models(parse_job(text % ", is_v_pred: true"))
    assert predicts_v(model) and not predicts_v(loaded[0])
    assert not predicts_v(headless.load_models(parse_job(text % ""))[0])
