"""YAML jobs in ai-toolkit's dialect: ai-toolkit's files load as they are, map onto the engine's settings, and
mistakes are errors that name the key and what to write instead."""
from pathlib import Path

import pytest
import yaml

from conftest import write_images
from eridiffusion.trainers.config import ConfigError
from eridiffusion.trainers.distributed import World
from eridiffusion.trainers.job import build_dataset, load_job, parse_job

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# ai-toolkit's config/examples/train_lora_flux_24gb.yaml (comments dropped), as its users write it.
AI_TOOLKIT_FLUX = """\
---
job: extension
config:
  name: "my_first_flux_lora_v1"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 16
        linear_alpha: 16
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
        push_to_hub: false
      datasets:
        - folder_path: "/path/to/images/folder"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 512, 768, 1024 ]
      train:
        batch_size: 1
        steps: 2000
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        optimizer: "adamw8bit"
        lr: 1e-4
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: "black-forest-labs/FLUX.1-dev"
        is_flux: true
        quantize: true
      sample:
        sampler: "flowmatch"
        sample_every: 250
        sample_start_step: 0
        width: 1024
        height: 1024
        prompts:
          - "[trigger] holding a sign that says 'I LOVE PROMPTS!'"
          - "a bear building a log cabin in the snow covered mountains"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""


def edited(text: str, edit) -> str:
    data = yaml.safe_load(text)
    edit(data["config"]["process"][0])
    return yaml.safe_dump(data)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_job(text, "job.yaml")
    return str(e.value)


def test_ai_toolkits_flux_example_loads_as_it_is_onto_the_engine_settings():
    job = parse_job(AI_TOOLKIT_FLUX, "flux.yaml")
    s = job.settings
    assert (job.name, job.model.arch, job.model.quantize, job.steps) == ("my_first_flux_lora_v1", "flux", True, 2000)
    assert (s.optimizer, s.learning_rate, s.precision, s.batch_size, s.grad_accumulation) == \
        ("adamw8bit", 1e-4, "bf16", 1, 1)
    assert s.gradient_checkpointing and s.caption_dropout == 0.0
    assert {c.caption_dropout for c in job.datasets[0].configs} == {0.05}     # each dataset's own rate
    assert (job.network.kind, job.network.rank, job.network.alpha, job.network.dora) == ("lora", 16, 16.0, False)
    assert [c.resolution for c in job.datasets[0].configs] == [512, 768, 1024]
    assert {c.trigger_word for c in job.datasets[0].configs} == {"p3r5on"}
    assert job.datasets[0].configs[0].caption_ext == ".txt"
    assert (job.save.dtype, job.save.save_every, job.save.max_step_saves_to_keep) == ("fp16", 250, 4)
    sample = job.sample
    assert sample.prompts[0] == "p3r5on holding a sign that says 'I LOVE PROMPTS!'"
    assert (sample.sampler_name, sample.scheduler, sample.seed, sample.guidance_scale, sample.sample_steps) == \
        ("euler", "simple", 42, 4.0, 20)
    assert job.meta == {"name": "my_first_flux_lora_v1", "version": "1.0"}
    # walk_seed: prompt i samples with seed + i, as in ai-toolkit
    assert [o.seed for o in sample.options] == [42, 43]
    # EMA and walk_seed work; switches that are off (push_to_hub) are not worth a warning
    assert s.ema and s.ema_decay == 0.99 and job.ignored_warning() is None


def test_ai_toolkit_defaults_apply_where_a_key_is_left_out():
    job = parse_job("config:\n  name: x\n  process:\n    - datasets: [{folder_path: imgs}]\n"
                    "      network: {type: lora}\n", "x.yaml")
    # ai-toolkit: lr 1e-6, linear_alpha = alpha = 1.0, dtype fp32, resolution 512, save every 1000 keep 5
    assert (job.settings.learning_rate, job.network.alpha, job.settings.precision) == (1e-6, 1.0, "fp32")
    assert job.datasets[0].configs[0].resolution == 512
    assert (job.save.save_every, job.save.max_step_saves_to_keep) == (1000, 5)
    assert job.sample is None and job.training_folder == "output"


def test_speed_settings_of_our_own_map_onto_the_engine():
    job = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(
        compile="off", checkpoint_fraction=0.9, recompute_attention=True)), "x.yaml")
    s = job.settings
    assert (s.compile, s.checkpoint_fraction, s.recompute_attention) == ("off", 0.9, True)
    assert parse_job(AI_TOOLKIT_FLUX, "flux.yaml").settings.compile == "cuda_graphs"
    assert "checkpoint_fraction" in error_of(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(
        checkpoint_fraction=1.5)))


@pytest.mark.parametrize("edit, path, suggestion", [
    (lambda p: p["train"].update(lrr=1e-4), "config.process[0].train.lrr", "'lr'"),
    (lambda p: p["network"].update(linear_alpah=8), "config.process[0].network.linear_alpah", "'linear_alpha'"),
    (lambda p: p["datasets"][0].update(folder=""), "config.process[0].datasets[0].folder", "'folder_path'"),
    (lambda p: p.update(trainer={}), "config.process[0].trainer", "'train'"),
])
def test_an_unknown_key_is_an_error_naming_its_path_and_the_closest_known_key(edit, path, suggestion):
    message = error_of(edited(AI_TOOLKIT_FLUX, edit))
    assert path in message and suggestion in message and message.startswith("job.yaml: ")


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["train"].update(steps="many"), ["train.steps", "whole number", "'many'"]),
    (lambda p: p["train"].update(batch_size=0), ["train.batch_size", "between 1 and 4096", "got 0"]),
    (lambda p: p["train"].update(lr="fast"), ["train.lr", "number"]),
    (lambda p: p["train"].update(gradient_checkpointing="yes"), ["gradient_checkpointing", "true or false"]),
    (lambda p: p["train"].update(optimizer="dadaptation"), ["train.optimizer", "adamw, adamw8bit, adafactor, prodigy"]),
    (lambda p: p["train"].update(loss_type="wavelet"), ["train.loss_type", "mse, l2, l1, mae, huber, smooth_l1"]),
    (lambda p: p["train"].update(lr_scheduler="cosine_annealing"), ["train.lr_scheduler", "cosine_with_restarts"]),
    (lambda p: p["train"].update(lr_scheduler_params={"num_cycles": 0}), ["lr_scheduler_params.num_cycles",
                                                                          "between 1"]),
    (lambda p: p["train"].update(dtype="int8"), ["train.dtype", "bf16"]),
    (lambda p: p["datasets"][0].update(resolution=[512, 700]), ["datasets[0].resolution", "700", "multiple of 64"]),
    (lambda p: p["datasets"][0].update(caption_dropout_rate=1.5), ["caption_dropout_rate", "between 0"]),
    (lambda p: p["network"].update(type="lorm"), ["network.type", "lora, locon, dora, lokr, loha"]),
    (lambda p: p["train"].update(noise_scheduler="ddpm"), ["noise_scheduler", "flowmatch"]),
    (lambda p: p["train"].update(train_unet=False), ["train_unet", "train nothing"]),
    (lambda p: p["model"].update(arch="sdxl"), ["arch", "is_flux", "keep one"]),
    (lambda p: p["model"].update(is_flux=False, is_v2=True), ["is_v2", "SD 2", "not supported"]),
    (lambda p: p.update(type="extract"), ["type", "sd_trainer"]),
    (lambda p: p["sample"].update(sampler="eulr"), ["sample.sampler", "'euler'"]),
])
def test_a_wrong_value_is_an_error_naming_the_key_and_what_fits(edit, words):
    message = error_of(edited(AI_TOOLKIT_FLUX, edit))
    assert all(w in message for w in words), message


@pytest.mark.parametrize("name, ours", [
    ("adamw", "adamw"), ("AdamW8bit", "adamw8bit"), ("adafactor", "adafactor"), ("prodigy", "prodigy"),
    ("lion", "lion"), ("lion8bit", "lion8bit"), ("AdamWScheduleFree", "adamw_schedulefree"), ("came", "came")])
def test_ai_toolkit_and_kohya_optimizer_names_map_onto_ours(name, ours):
    settings = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(optimizer=name)), "x.yaml").settings
    assert settings.optimizer == ours
    # ai-toolkit trains Prodigy at lr 1.0 when the job's lr is below 0.1 (Prodigy finds its own step size)
    assert settings.learning_rate == (1.0 if ours == "prodigy" else 1e-4)


def test_lr_scheduler_and_its_params_map_onto_the_schedule_settings_and_unknown_params_are_warned():
    def settings(**train):
        return parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(train)), "x.yaml")
    restarts = settings(lr_scheduler="cosine_with_restarts", lr_scheduler_params={"num_cycles": 3}).settings
    assert (restarts.schedule, restarts.schedule_cycles) == ("cosine_with_restarts", 3)
    poly = settings(lr_scheduler="polynomial", lr_scheduler_params={"power": 2.0}).settings
    assert (poly.schedule, poly.schedule_power) == ("polynomial", 2.0)
    step = settings(lr_scheduler="step", lr_scheduler_params={"step_size": 100, "gamma": 0.5}).settings
    assert (step.schedule, step.schedule_step_size, step.schedule_gamma) == ("step", 100, 0.5)
    assert settings(lr_scheduler="constant_with_warmup", warmup_steps=10).settings.schedule == "constant_with_warmup"
    job = settings(lr_scheduler="cosine", lr_scheduler_params={"eta_min": 1e-6})
    assert any("train.lr_scheduler_params" in line and "eta_min" in line for line in job.ignored)


def test_loss_type_and_kohyas_huber_settings_map_onto_the_loss_settings_without_a_warning():
    job = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(
        loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=2.0)), "x.yaml")
    s = job.settings
    assert (s.loss_type, s.huber_schedule, s.huber_c, s.huber_scale) == ("huber", "exponential", 0.2, 2.0)
    assert not any("loss_type" in line for line in job.ignored)
    assert parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(loss_type="mae")),
                     "x.yaml").settings.loss_type == "l1"
    assert parse_job(AI_TOOLKIT_FLUX, "x.yaml").settings.loss_type == "mse"


def test_architecture_from_arch_or_ai_toolkits_flags():
    base = "config:\n  name: x\n  process:\n    - network: {type: lora}\n      model: {%s}\n"
    assert parse_job(base % "arch: sd35").model.arch == "sd3"
    assert parse_job(base % "is_v3: true").model.arch == "sd3"
    assert parse_job(base % "is_xl: true").model.arch == "sdxl"
    assert parse_job(base % "arch: 'flux:dev'").model.arch == "flux"
    assert parse_job(base % "arch: chroma").model.arch == "chroma"
    assert parse_job(base % "arch: qwen_image").model.arch == "qwen_image"
    assert "chroma" in error_of(base % "arch: hidream")
    assert parse_job(base % "arch: flux2").model.arch == "flux2"
    assert "flux2" in error_of(base % "arch: hidream")
    assert parse_job(base % "name_or_path: m.safetensors").model.arch == ""   # taken from the MODEL


def test_network_types_map_onto_adapter_specs():
    def network(**values):
        return parse_job(edited(AI_TOOLKIT_FLUX, lambda p: (p["network"].clear(), p["network"].update(values),
                                                             p["model"].update(is_flux=False, is_xl=True),
                                                             p["train"].pop("noise_scheduler"))),
                         "x.yaml").network
    dora = network(type="dora", linear=8)
    assert (dora.kind, dora.dora, dora.rank, dora.alpha) == ("lora", True, 8, 1.0)
    lokr = network(type="lokr", linear=4, lokr_factor=8, lokr_full_rank=True)
    assert (lokr.kind, lokr.lokr_factor, lokr.lokr_full_w2) == ("lokr", 8, True)
    locon = network(type="locon", linear=16, linear_alpha=8, conv=4)
    assert (locon.kind, locon.conv, locon.conv_rank, locon.conv_alpha) == ("lora", True, 4, 4.0)
    assert network(type="loha", rank=2, alpha=2, dora_wd=True).dora
    assert network(type="lora", linear=4, target="all_linear").preset == "all_linear"


def test_yaml_is_read_safely_and_bad_yaml_is_a_config_error():
    assert "not valid YAML" in error_of("config: [unclosed")
    message = error_of("!!python/object/apply:os.system ['echo hacked']\n")
    assert "not valid YAML" in message


def test_the_seed_example_and_every_shipped_job_load():
    jobs = {path.stem: load_job(str(path)) for path in sorted(CONFIGS.glob("*.yaml"))}
    names = ("seed_example", "sdxl_lora", "sd35_lora", "flux_lora", "flux_schnell_lora", "zimage_lora",
             "qwen_image_edit_lora", "flux2_lora")
    assert set(names) <= set(jobs)
    assert [jobs[n].model.arch for n in names] == ["sdxl", "sdxl", "sd3", "flux", "flux", "zimage", "qwen_image",
                                                   "flux2"]
    assert jobs["qwen_image_edit_lora"].datasets[0].control_path == "/path/to/control/images/folder"
    assert all(not job.ignored for job in jobs.values())
    assert jobs["sdxl_lora"].network.conv and jobs["flux_lora"].model.text_encoder_paths
    with pytest.raises(ConfigError, match="no datasets"):
        build_dataset(jobs["seed_example"], lambda folder, key: folder)


def test_datasets_at_several_resolutions_and_repeats_make_one_dataset(tmp_path):
    write_images(tmp_path / "a", [(128, 128), (192, 128)])
    write_images(tmp_path / "b", [(128, 128)], captions=False)
    job = parse_job("""
config:
  name: x
  process:
    - trigger_word: ohwx
      network: {type: lora}
      datasets:
        - {folder_path: a, resolution: [64, 128], num_repeats: 3}
        - {folder_path: b, resolution: 64, default_caption: "[trigger] on white", flip_x: true}
""")
    seen = []
    dataset = build_dataset(job, lambda folder, key: (seen.append(key), str(tmp_path / folder))[1])
    assert seen == ["datasets[0].folder_path", "datasets[1].folder_path"]
    a = [i for i in dataset.items if "/a/" in i.path]
    b = [i for i in dataset.items if "/b/" in i.path]
    assert len(a) == 4 and all(i.repeats == 3 for i in a)
    assert {(i.bucket.width * i.bucket.height <= 64 * 64) for i in a} == {True, False}   # both resolutions
    assert len(b) == 2 and {i.flip for i in b} == {False, True} and b[0].caption == "ohwx on white"
    assert a[0].caption == "ohwx, a photo of pattern 0"


def test_each_rank_takes_a_contiguous_share_and_together_all_samples():
    for size in (1, 2, 3):
        for count in range(0, 7):
            shares = [list(range(count))[World(rank, size).share(count)] for rank in range(size)]
            assert sum(shares, []) == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# A job as ai-toolkit's web UI exports it (ui/src/app/jobs/new/jobConfig.ts defaultJobConfig with
# helpers/defaultSamples.ts, then a model chosen: options.tsx sets name_or_path, arch, quantize, sampler), trimmed
# to two sample prompts.
AI_TOOLKIT_UI_JOB = """\
job: extension
config:
  name: my_first_lora_v1
  process:
    - type: diffusion_trainer
      training_folder: output
      sqlite_db_path: ./aitk_db.db
      device: cuda
      trigger_word: null
      performance_log_every: 10
      network:
        type: lora
        linear: 32
        linear_alpha: 32
        conv: 16
        conv_alpha: 16
        lokr_full_rank: true
        lokr_factor: -1
        network_kwargs:
          ignore_if_contains: []
      save:
        dtype: bf16
        save_every: 250
        max_step_saves_to_keep: 4
        save_format: diffusers
        push_to_hub: false
      datasets:
        - folder_path: /path/to/images/folder
          mask_path: null
          mask_min_value: 0.1
          default_caption: ''
          caption_ext: txt
          caption_dropout_rate: 0.05
          cache_latents_to_disk: false
          is_reg: false
          network_weight: 1
          resolution: [512, 768, 1024]
          controls: []
          shrink_video_to_frames: true
          num_frames: 1
          flip_x: false
          flip_y: false
          num_repeats: 1
      train:
        batch_size: 1
        bypass_guidance_embedding: true
        steps: 3000
        gradient_accumulation: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: flowmatch
        optimizer: adamw8bit
        timestep_type: sigmoid
        content_or_style: balanced
        optimizer_params:
          weight_decay: 0.0001
        unload_text_encoder: false
        cache_text_embeddings: false
        lr: 0.0001
        ema_config:
          use_ema: false
          ema_decay: 0.99
        skip_first_sample: false
        force_first_sample: false
        disable_sampling: false
        dtype: bf16
        diff_output_preservation: false
        diff_output_preservation_multiplier: 1.0
        diff_output_preservation_class: person
        switch_boundary_every: 1
        loss_type: mse
      logging:
        log_every: 1
        use_ui_logger: true
      model:
        name_or_path: black-forest-labs/FLUX.1-dev
        quantize: true
        qtype: qfloat8
        quantize_te: true
        qtype_te: qfloat8
        arch: flux
        low_vram: false
        model_kwargs: {}
        compile: false
      sample:
        sampler: flowmatch
        sample_every: 250
        sample_start_step: 0
        width: 1024
        height: 1024
        samples:
          - prompt: woman with red hair, playing chess at the park, bomb going off in the background
          - prompt: a bear building a log cabin in the snow covered mountains
        neg: ''
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 30
        num_frames: 1
        fps: 1
meta:
  name: '[name]'
  version: '1.0'
"""

UI_MODELS = {   # what options.tsx sets when a model is chosen (the UI has no SD 3.5 entry: ai-toolkit's arch sd3)
    "flux": {},
    "sdxl": {"model": {"name_or_path": "stabilityai/stable-diffusion-xl-base-1.0", "arch": "sdxl", "quantize": False,
                       "quantize_te": False},
             "train": {"noise_scheduler": "ddpm"}, "sample": {"sampler": "ddpm", "guidance_scale": 6}},
    "sd3": {"model": {"name_or_path": "stabilityai/stable-diffusion-3.5-large", "arch": "sd3", "quantize": False,
                      "quantize_te": False}},
}


def ui_job(arch: str, **edits) -> str:
    def edit(p):
        for section, values in {**UI_MODELS[arch], **edits}.items():
            p[section].update(values)
    return edited(AI_TOOLKIT_UI_JOB, edit)


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_a_job_as_ai_toolkits_web_ui_exports_it_loads_with_one_warning_of_what_has_no_effect(arch):
    job = parse_job(ui_job(arch), "ui.yaml")
    assert (job.model.arch, job.network.rank, job.network.alpha, job.steps) == (arch, 32, 32.0, 3000)
    assert (job.save.dtype, job.settings.optimizer, job.settings.learning_rate) == ("bf16", "adamw8bit", 1e-4)
    assert job.sample.prompts[1] == "a bear building a log cabin in the snow covered mountains"
    warning = job.ignored_warning()
    assert warning.count("\n") == 0
    # the UI's bookkeeping has no effect here, and is named
    assert all(key in warning for key in ("sqlite_db_path", "performance_log_every", "logging"))
    # what is off, or only tunes a feature that is off, or cannot matter for an adapter, is not
    for quiet in ("diff_output_preservation", "mask_min_value", "ema_config", "network_kwargs", "save_format",
                  "fps", "qtype", "content_or_style", "loss_type", "model_kwargs"):
        assert quiet not in warning, quiet
    # Flux-only settings warn on Flux only; SD 3.5 and Flux have no convolutions: conv is dropped, with a word
    assert ("bypass_guidance_embedding" in warning) == (arch == "flux")
    assert ("quantize_te" in warning) == (arch == "flux")
    assert job.network.conv == (arch == "sdxl") and ("network.conv: 16" in warning) == (arch != "sdxl")


def test_a_ui_job_without_model_arch_is_resolved_for_the_model_it_meets():
    data = yaml.safe_load(AI_TOOLKIT_UI_JOB)
    del data["config"]["process"][0]["model"]["arch"]
    job = parse_job(yaml.safe_dump(data), "ui.yaml")
    assert job.network.conv and "bypass_guidance_embedding" not in job.ignored_warning()
    # until a MODEL says otherwise, timesteps as ai-toolkit's flow-matching models draw them
    assert (job.settings.timestep_sampling, job.settings.timestep_shift) == ("sigmoid", 1.0)
    flux = job.for_arch("flux")
    assert not flux.network.conv and "network.conv" in flux.ignored_warning()
    assert "bypass_guidance_embedding" in flux.ignored_warning()
    assert (flux.settings.timestep_sampling, flux.settings.timestep_shift) == ("sigmoid", 1.0)
    sdxl = job.for_arch("sdxl")
    assert sdxl.network.conv and (sdxl.settings.timestep_sampling, sdxl.settings.timestep_shift) == ("auto", 0.0)
    assert "bypass_guidance_embedding" not in sdxl.ignored_warning()


@pytest.mark.parametrize("text, words", [
    # ai-toolkit's config/examples/train_slider.example.yml, its first lines
    ("job: train\nconfig:\n  name: detail_slider_v1\n  training_folder: output/LoRA\n  device: cuda:0\n"
     "  process:\n    - type: slider\n      network: {type: lierla, linear: 8, linear_alpha: 4}\n",
     ["job 'train'", "concept slider trainer", "'slider'", "does not support", "job: extension"]),
    ("job: generate\nconfig:\n  name: x\n  process:\n    - type: to_folder\n",
     ["job 'generate'", "image generation job", "does not support"]),
    (AI_TOOLKIT_UI_JOB.replace("type: diffusion_trainer", "type: concept_slider"),
     ["type 'concept_slider'", "concept slider trainer", "does not support"]),
    (AI_TOOLKIT_UI_JOB.replace("type: diffusion_trainer", "type: textual_inversion_trainer"),
     ["textual inversion", "does not support"]),
    (edited(AI_TOOLKIT_FLUX, lambda p: p.pop("network")),
     ["config.process[0] has no network section", "fine-tunes the whole model", "does not support"]),
    (edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(timestep_type="next_sample")),
     ["train.timestep_type 'next_sample' is not supported", "flux_shift"]),
])
def test_slider_and_other_non_adapter_jobs_are_errors_saying_what_the_job_is(text, words):
    message = error_of(text)
    assert all(w in message for w in words), message


def test_ui_jobs_and_sd_trainer_jobs_train_the_same():
    ui = parse_job(AI_TOOLKIT_UI_JOB, "ui.yaml")
    sd_trainer = parse_job(AI_TOOLKIT_UI_JOB.replace("type: diffusion_trainer", "type: sd_trainer"), "ui.yaml")
    assert (ui.settings, ui.network, ui.datasets) == (sd_trainer.settings, sd_trainer.network, sd_trainer.datasets)


def test_a_setting_of_a_feature_is_warned_once_the_feature_is_on():
    def switch_on(p):
        p["train"].update(blank_prompt_preservation=True, blank_prompt_preservation_multiplier=1.0)
    quiet = parse_job(edited(ui_job("sdxl"), lambda p: p["train"].update(blank_prompt_preservation_multiplier=1.0)),
                      "ui.yaml").ignored_warning()
    assert "blank_prompt_preservation_multiplier" not in quiet
    warning = parse_job(edited(ui_job("sdxl"), switch_on), "ui.yaml").ignored_warning()
    assert "train.blank_prompt_preservation: True" in warning
    assert "blank_prompt_preservation_multiplier: 1.0" in warning


@pytest.mark.parametrize("keys, expected", [
    ({}, ("off", "", 0.1)),
    ({"alpha_mask": True}, ("alpha", "", 0.1)),
    ({"mask_path": "masks", "mask_min_value": 0.25}, ("mask_folder", "masks", 0.25)),
    ({"masked_loss": True}, ("alpha", "", 0.1)),                        # kohya's switch: alpha without mask_path
    ({"masked_loss": True, "mask_path": "masks"}, ("mask_folder", "masks", 0.1)),
    ({"masked_loss": "alpha"}, ("alpha", "", 0.1)),
])
def test_masked_loss_keys_set_the_datasets_masks(keys, expected):
    job = parse_job(edited(ui_job("sdxl"), lambda p: p["datasets"][0].update(keys)), "ui.yaml")
    config = job.datasets[0].configs[0]
    assert (config.masked_loss, config.mask_folder, config.mask_min_value) == expected
    assert job.datasets[0].mask_path == expected[1]
    assert "mask" not in (job.ignored_warning() or "")


def test_masked_loss_mask_folder_without_mask_path_is_an_error():
    message = error_of(edited(ui_job("sdxl"), lambda p: p["datasets"][0].update(masked_loss="mask_folder")))
    assert "datasets[0].masked_loss mask_folder needs config.process[0].datasets[0].mask_path" in message


def test_a_validation_dataset_is_held_out_and_evaluated_every_n_steps():
    def add(p):
        p["datasets"].append({"folder_path": "held_out", "validation": True})
        p["train"].update(validate_every_n_steps=25)
    job = parse_job(edited(ui_job("sdxl"), add), "ui.yaml")
    assert [d.validation for d in job.datasets] == [False, True] and job.validation_every == 25
    only_held_out = edited(ui_job("sdxl"), lambda p: p["datasets"][0].update(validation=True))
    assert "no datasets to train on" in error_of_build(only_held_out)


def error_of_build(text: str) -> str:
    from eridiffusion.trainers.job import build_dataset
    with pytest.raises(ConfigError) as e:
        build_dataset(parse_job(text, "job.yaml"), lambda folder, key: folder)
    return str(e.value)


# ------------------------------------------------------------------------------ per-prompt sample settings
def sample_of(**sample):
    return parse_job(edited(AI_TOOLKIT_FLUX, lambda p: (p["model"].update(is_flux=False, is_xl=True),
                                                        p["train"].pop("noise_scheduler"),
                                                        p["sample"].update(sampler="euler", **sample))),
                     "x.yaml")


def test_each_sample_item_keeps_its_own_size_seed_negative_guidance_and_steps():
    job = sample_of(prompts=[], walk_seed=False, samples=[
        {"prompt": "[trigger] close up", "width": 768, "height": 1030, "seed": 7, "neg": "blurry",
         "guidance_scale": 4.5, "sample_steps": 30},
        {"prompt": "a plain one"}])
    s = job.sample
    assert s.prompts == ("p3r5on close up", "a plain one")
    first, plain = s.options
    # the height is rounded down to a multiple of 8 as ai-toolkit does; SDXL takes guidance_scale as its CFG
    assert (first.width, first.height, first.seed, first.negative, first.cfg, first.steps, first.guidance) == \
        (768, 1024, 7, "blurry", 4.5, 30, None)
    assert plain == type(plain)() and not job.ignored


def test_prompt_flags_as_sd_scripts_and_ai_toolkit_write_them_set_a_prompts_own_options():
    job = sample_of(walk_seed=False, prompts=["[trigger] at night --w 512 --h 768 --d 3 --l 6 --s 12 --n dark, noisy",
                                              "a--b stays text"])
    night, text = job.sample.options
    assert job.sample.prompts == ("p3r5on at night", "a--b stays text")
    assert (night.width, night.height, night.seed, night.cfg, night.steps, night.negative) == \
        (512, 768, 3, 6.0, 12, "dark, noisy")
    assert text == type(text)()


def test_a_flux_jobs_guidance_scale_per_prompt_is_its_embedded_guidance():
    job = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["sample"].update(
        prompts=["a --l 2.5"], samples=[{"prompt": "b", "guidance_scale": 5}])), "x.yaml")
    a, b = job.sample.options
    assert (a.guidance, a.cfg, b.guidance, b.cfg) == (2.5, None, 5.0, None)


def arch_job(arch: str, name_or_path: str, guidance_scale: float, **train) -> str:
    """ai-toolkit's example for `arch` (config/examples/train_lora_<arch>_24gb.yaml): Flux's keys with model.arch
    instead of is_flux, one sample prompt with its own guidance_scale."""
    def edit(p):
        p["model"].pop("is_flux")
        p["model"].update(name_or_path=name_or_path, arch=arch)
        p["train"].update(train)
        p["sample"].update(samples=[{"prompt": "b", "guidance_scale": guidance_scale}])
    return edited(AI_TOOLKIT_FLUX, edit)


def chroma_job(**train) -> str:
    return arch_job("chroma", "lodestones/Chroma", 5, **train)


def test_ai_toolkits_chroma_example_trains_chroma_with_its_timesteps_and_guidance_scale_as_cfg():
    job = parse_job(chroma_job(), "chroma.yaml")
    assert (job.model.arch, job.sample.sampler_name, job.sample.guidance_scale) == ("chroma", "euler", 4.0)
    # ai-toolkit's Chroma samples with real CFG (a negative prompt), not Flux's embedded guidance
    assert (job.sample.options[-1].cfg, job.sample.options[-1].guidance) == (5.0, None)
    # its default timestep_type (sigmoid) is unshifted; shift is its flux_config-like dynamic shifting
    assert (job.settings.timestep_sampling, job.settings.timestep_shift) == ("sigmoid", 1.0)
    shifted = parse_job(chroma_job(timestep_type="shift"), "chroma.yaml").settings
    assert (shifted.timestep_sampling, shifted.timestep_shift, shifted.resolution_shift) == ("uniform", 0.0, True)


def qwen_image_job(**train) -> str:
    return arch_job("qwen_image", "Qwen/Qwen-Image", 4, **train)


def test_ai_toolkits_qwen_image_example_trains_qwen_image_with_its_timesteps_and_guidance_scale_as_cfg():
    job = parse_job(qwen_image_job(), "qwen.yaml")
    assert (job.model.arch, job.sample.sampler_name) == ("qwen_image", "euler")
    # ai-toolkit samples Qwen-Image with true CFG (a negative prompt): no embedded guidance
    assert (job.sample.options[-1].cfg, job.sample.options[-1].guidance) == (4.0, None)
    assert (job.settings.timestep_sampling, job.settings.timestep_shift) == ("sigmoid", 1.0)
    # shift: its scheduler's dynamic shifting by size (Qwen-Image's own range: trainers/arch/qwen_image.py)
    shifted = parse_job(qwen_image_job(timestep_type="shift"), "qwen.yaml").settings
    assert (shifted.timestep_sampling, shifted.timestep_shift, shifted.resolution_shift) == ("uniform", 0.0, True)
    v_pred = qwen_image_job().replace("arch: qwen_image", "arch: qwen_image\n      is_v_pred: true")
    assert "is_v_pred" in error_of(v_pred)


def test_a_qwen_image_job_that_trains_the_text_encoder_is_refused_naming_the_key():
    message = error_of(qwen_image_job(train_text_encoder=True))
    assert "train_text_encoder" in message and "Qwen" in message


def flux2_job(**train) -> str:
    return arch_job("flux2", "black-forest-labs/FLUX.2-dev", 5, **train)


def test_ai_toolkits_flux2_job_trains_flux2_with_its_timesteps_and_guidance_scale_as_embedded_guidance():
    job = parse_job(flux2_job(), "flux2.yaml")
    assert (job.model.arch, job.sample.sampler_name) == ("flux2", "euler")
    # ai-toolkit samples Flux.2-dev guidance-distilled: guidance_scale is the embedded guidance, at CFG 1
    assert (job.sample.options[-1].cfg, job.sample.options[-1].guidance) == (None, 5.0)
    # its scheduler_config is Flux's dynamic shifting (base 0.5, max 1.15 over 256..4096 tokens)
    shifted = parse_job(flux2_job(timestep_type="shift"), "flux2.yaml").settings
    assert (shifted.timestep_sampling, shifted.timestep_shift, shifted.resolution_shift) == ("uniform", 0.0, True)
    assert "is_v_pred" in error_of(edited(flux2_job(), lambda p: p["model"].update(is_v_pred=True)))


def test_a_flux2_job_that_trains_the_text_encoder_is_refused_naming_the_key():
    message = error_of(flux2_job(train_text_encoder=True))
    assert "train_text_encoder" in message and "Flux.2" in message


def zimage_job(arch="zimage", model=None, **train) -> str:
    """ai-toolkit's Z-Image Turbo example (config/examples/train_lora_zimage_turbo_32gb.yaml): model.arch zimage,
    its de-distillation training adapter as assistant_lora_path, weighted timesteps, CFG 1 in 8 steps."""
    def edit(p):
        p["model"].pop("is_flux")
        p["model"].update(name_or_path="Tongyi-MAI/Z-Image-Turbo", arch=arch, **(model or {}),
                          assistant_lora_path="ostris/zimage_turbo_training_adapter/adapter_v2.safetensors")
        p["train"].update({"timestep_type": "weighted", **train})
        p["sample"].update(guidance_scale=1, sample_steps=8, samples=[{"prompt": "b", "guidance_scale": 2}])
    return edited(AI_TOOLKIT_FLUX, edit)


def test_ai_toolkits_zimage_example_trains_zimage_with_its_shift_3_and_guidance_scale_as_cfg():
    job = parse_job(zimage_job(), "zimage.yaml")
    assert (job.model.arch, job.sample.sampler_name, job.sample.guidance_scale) == ("zimage", "euler", 1.0)
    assert parse_job(zimage_job("zimage:turbo"), "zimage.yaml").model.arch == "zimage"
    # CFG, as ai-toolkit samples Z-Image (no embedded guidance)
    assert (job.sample.options[-1].cfg, job.sample.options[-1].guidance) == (2.0, None)
    # the training adapter is not applied: the job says so
    assert any("assistant_lora_path" in line for line in job.ignored)
    assert (job.settings.timestep_sampling, job.settings.loss_weighting, job.settings.timestep_shift) == (
        "uniform", "weighted", 1.0)
    # shift: its scheduler's fixed shift 3.0 (no dynamic shifting), as SD 3.5's
    shifted = parse_job(zimage_job(timestep_type="shift"), "zimage.yaml").settings
    assert (shifted.timestep_sampling, shifted.timestep_shift, shifted.resolution_shift) == ("uniform", 3.0, False)


def test_a_zimage_job_refuses_text_encoder_training_and_v_prediction():
    assert "train.train_text_encoder" in error_of(zimage_job(train_text_encoder=True))
    assert "not supported" in error_of(zimage_job(train_text_encoder=True))
    assert "is_v_pred" in error_of(zimage_job(model={"is_v_pred": True}))


def test_walk_seed_gives_prompt_i_the_seed_plus_i_unless_it_has_its_own():
    job = sample_of(walk_seed=True, seed=42, prompts=["a", "b --d 9", "c"])
    assert [o.seed for o in job.sample.options] == [42, 9, 44]
    assert not job.ignored


def test_sample_options_ai_toolkit_has_but_we_do_not_are_named_in_the_one_warning():
    job = sample_of(walk_seed=False, prompts=["a --m 0.5"], samples=[{"prompt": "b", "network_multiplier": 0.8,
                                                                       "ctrl_img": "x.png"}])
    warning = job.ignored_warning()
    assert "sample.prompts[0]: --m 0.5" in warning
    assert "sample.samples[0].network_multiplier: 0.8" in warning and "sample.samples[0].ctrl_img" in warning


@pytest.mark.parametrize("sample, words", [
    (dict(samples=[{"prompt": "a", "widht": 512}]), ["sample.samples[0].widht", "'width'"]),
    (dict(samples=[{"prompt": "a", "width": 100_000}]), ["sample.samples[0]", "width", "8192"]),
    (dict(samples=[{"prompt": "a", "sample_steps": 5000}]), ["sample.samples[0]", "steps", "1000"]),
    (dict(samples=[{"prompt": "a", "seed": 2 ** 40}]), ["sample.samples[0]", "seed"]),
    (dict(samples=[{"prompt": "a", "steps": 3, "sample_steps": 4}]), ["same setting"]),
    (dict(prompts=["a --w huge"]), ["sample.prompts[0]", "--w", "whole number"]),
    (dict(prompts=["a --zz 1"]), ["sample.prompts[0]", "unknown prompt flag", "--zz"]),
    (dict(prompts=["a --s 0"]), ["sample.prompts[0]", "steps"]),
    (dict(neg=["x"]), ["sample.neg", "text"]),
])
def test_a_bad_per_prompt_setting_is_an_error_naming_the_prompt_and_the_bound(sample, words):
    with pytest.raises(ConfigError) as e:
        sample_of(**sample)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_is_v_pred_marks_an_sdxl_job_v_prediction_and_is_refused_for_flow_models():
    base = "config:\n  name: x\n  process:\n    - network: {type: lora}\n      model: {%s}\n"
    job = parse_job(base % "is_xl: true, is_v_pred: true")
    assert job.model.v_pred and not job.ignored
    assert not parse_job(base % "is_xl: true").model.v_pred
    assert "is_v_pred" in error_of(base % "is_flux: true, is_v_pred: true")
    assert "is_v_pred" in error_of(base % "arch: chroma, is_v_pred: true")


def test_ema_config_maps_onto_the_ema_settings_and_its_unsupported_keys_are_named():
    s = parse_job(AI_TOOLKIT_FLUX, "flux.yaml").settings
    assert (s.ema, s.ema_decay, s.ema_every, s.ema_on_cpu) == (True, 0.99, 1, False)
    job = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(ema_config=dict(
        use_ema=True, ema_decay=0.9, ema_every=4, ema_on_cpu=True, use_feedback=True))), "x.yaml")
    assert (job.settings.ema_decay, job.settings.ema_every, job.settings.ema_on_cpu) == (0.9, 4, True)
    assert "train.ema_config.use_feedback: True" in job.ignored_warning()
    assert not parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(
        ema_config=dict(use_ema=False, ema_decay=0))), "x.yaml").settings.ema
    assert "ema_config.ema_decay" in error_of(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(
        ema_config=dict(use_ema=True, ema_decay=1.0))))
    assert "ema_config.ema_decya" in error_of(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(
        ema_config=dict(use_ema=True, ema_decya=0.9))))


def test_caption_shuffle_keep_tokens_and_dropout_are_each_datasets_own():
    job = parse_job("""
config:
  name: x
  process:
    - network: {type: lora}
      datasets:
        - {folder_path: a, shuffle_tokens: true, keep_tokens: 1, caption_variants: 8, caption_dropout_rate: 0.1}
        - {folder_path: b, caption_dropout_rate: 0.3}
""")
    a, b = (d.configs[0] for d in job.datasets)
    assert (a.shuffle_captions, a.keep_tokens, a.caption_variants, a.caption_dropout) == (True, 1, 8, 0.1)
    assert (b.shuffle_captions, b.caption_dropout) == (False, 0.3) and not job.ignored
    assert "caption_variants" in error_of(edited(AI_TOOLKIT_FLUX, lambda p: p["datasets"][0].update(
        caption_variants=9)))
    assert "token_dropout_rate: 0.1" in parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["datasets"][0].update(
        token_dropout_rate=0.1))).ignored_warning()


# ----------------------------------------------------------- regularisation images, differential output preservation
def preserving(p, **train):
    p.update(trigger_word="ohwx")
    p["train"].update({**dict(diff_output_preservation=True, diff_output_preservation_multiplier=0.5,
                              diff_output_preservation_class="person", reg_weight=0.25), **train})
    p["datasets"].append({"folder_path": "reg", "is_reg": True})


def test_regularisation_and_preservation_keys_are_read_with_ai_toolkits_names():
    from eridiffusion.trainers.job import AITK_IGNORED, AITK_SUBKEYS
    job = parse_job(edited(ui_job("sdxl"), preserving), "ui.yaml")
    s = job.settings
    assert (s.reg_weight, s.diff_output_preservation, s.diff_output_preservation_multiplier) == (0.25, True, 0.5)
    train_set, reg_set = (d.configs[0] for d in job.datasets)
    assert (train_set.is_reg, train_set.trigger_word, train_set.preservation_class) == (False, "ohwx", "person")
    assert (reg_set.is_reg, reg_set.preservation_class) == (True, "")
    warning = job.ignored_warning() or ""
    assert not any(key in warning for key in ("is_reg", "reg_weight", "diff_output_preservation"))
    assert not {"reg_weight", "diff_output_preservation", "diff_output_preservation_multiplier",
                "diff_output_preservation_class"} & (set(AITK_IGNORED["train"]) | set(AITK_SUBKEYS["train"]))
    assert "is_reg" not in AITK_IGNORED["datasets"]
    kohya = parse_job(edited(ui_job("sdxl"), lambda p: p["train"].update(prior_loss_weight=0.75)), "ui.yaml")
    assert kohya.settings.reg_weight == 0.75
    # left out, they are ai-toolkit's defaults: no regularisation weight change, no preservation
    plain = parse_job(ui_job("sdxl"), "ui.yaml").settings
    assert (plain.reg_weight, plain.diff_output_preservation) == (1.0, False)


@pytest.mark.parametrize("edit, words", [
    (lambda p: preserving(p, diff_output_preservation_class=""),
     ["train.diff_output_preservation needs", "diff_output_preservation_class", "class word"]),
    (lambda p: (preserving(p), p.update(trigger_word=None)),
     ["replaces the trigger word", "datasets[0] has none", "trigger_word"]),
    (lambda p: preserving(p, reg_weight=-1), ["train.reg_weight must be between 0.0 and 1000.0"]),
    (lambda p: p["datasets"][0].update(is_reg="yes"), ["is_reg must be true or false"]),
    (lambda p: preserving(p, prior_loss_weight=0.5), ["reg_weight and", "prior_loss_weight are the same setting"]),
])
def test_preservation_without_its_class_or_trigger_word_and_bad_values_are_errors(edit, words):
    message = error_of(edited(ui_job("sdxl"), edit))
    assert all(w in message for w in words), message


def test_a_jobs_regularisation_dataset_gives_regularisation_items(tmp_path):
    write_images(tmp_path / "train", [(64, 64)] * 2)
    write_images(tmp_path / "reg", [(64, 64)] * 3, seed=1, prefix="reg")
    job = parse_job(edited(ui_job("sdxl"), lambda p: (
        preserving(p), p["datasets"][0].update(folder_path="train", resolution=64),
        p["datasets"][1].update(resolution=64))), "ui.yaml")
    dataset = build_dataset(job, lambda folder, key: str(tmp_path / folder))
    assert [i.is_reg for i in dataset.items] == [False] * 2 + [True] * 3
    assert "person, a photo of pattern 0" in dataset.captions and "ohwx, a photo of pattern 0" in dataset.captions


def test_train_text_encoder_and_text_encoder_lr_map_onto_the_adapter_and_the_settings_without_a_warning():
    def on(p):
        p["train"].update(train_text_encoder=True, text_encoder_lr=5e-5)
    job = parse_job(edited(AI_TOOLKIT_FLUX, on), "job.yaml")
    # (Create adapter's clip_l+clip_g is CLIP-L alone on Flux, which has no CLIP-G)
    assert job.network.text_encoder == "clip_l+clip_g" and job.settings.text_encoder_lr == 5e-5
    assert not any("text_encoder" in entry for entry in job.ignored)
    plain = parse_job(AI_TOOLKIT_FLUX, "job.yaml")
    assert plain.network.text_encoder == "none" and plain.settings.text_encoder_lr == 0.0
    assert "text_encoder_lr" in error_of(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(text_encoder_lr=-1)))


@pytest.mark.parametrize("model, train, budget", [
    ({}, {}, 0.0),                                                          # off: the whole model loaded
    ({}, {"memory_budget_gb": 10}, 10.0),                                   # ours, in GiB
    ({"layer_offloading": True}, {}, 0.1),                                  # ai-toolkit's: every layer streams
    ({"layer_offloading": True, "layer_offloading_transformer_percent": 0.0}, {}, 0.0),   # a share of none
    ({"layer_offloading": False, "layer_offloading_transformer_percent": 0.5}, {}, 0.0),
    ({"layer_offloading": True}, {"memory_budget_gb": 12}, 12.0),           # a budget given wins
    ({}, {"blocks_to_swap": 18}, 0.1),                                      # kohya's block swap
    ({}, {"blocks_to_swap": 0}, 0.0),
])
def test_layer_offloading_and_block_swap_map_onto_the_memory_budget(model, train, budget):
    def edit(p):
        p["model"].update(model)
        p["train"].update(train)
    job = parse_job(edited(AI_TOOLKIT_FLUX, edit), "x.yaml")
    assert job.settings.memory_budget_gb == budget
    assert "layer_offloading" not in (job.ignored_warning() or "")


def test_a_share_of_layers_offloaded_is_named_in_the_warning_as_every_layer_streams():
    job = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["model"].update(
        layer_offloading=True, layer_offloading_transformer_percent=0.6)), "x.yaml")
    assert job.settings.memory_budget_gb == 0.1
    assert ("model.layer_offloading_transformer_percent: 0.6 (every layer streams; set train.memory_budget_gb in "
            "GiB to keep some on the GPU)") in job.ignored_warning()
    assert "memory_budget_gb" in error_of(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(memory_budget_gb=-1)))


def test_ai_toolkits_flux_kontext_job_trains_flux_on_the_control_images_of_control_path(tmp_path):
    def kontext(p):
        p["model"].update(arch="flux_kontext")
        p["datasets"][0].update(folder_path="edited", control_path="before", resolution=[64])
    job = parse_job(edited(ui_job("flux"), kontext), "ui.yaml")
    assert job.model.arch == "flux" and job.datasets[0].control_path == "before"
    assert job.datasets[0].configs[0].control_folder == "before"
    assert "control_path" not in (job.ignored_warning() or "")
    write_images(tmp_path / "edited", ((64, 64),) * 2)
    write_images(tmp_path / "before", ((64, 64),) * 2, captions=False, seed=3)
    seen = []
    dataset = build_dataset(job, lambda folder, key: (seen.append(key), str(tmp_path / folder))[1])
    assert "datasets[0].control_path" in seen
    assert sorted(Path(i.control).name for i in dataset.items) == ["img0.png", "img1.png"]
    assert all(Path(i.control).parent == tmp_path / "before" for i in dataset.items)
    (tmp_path / "before" / "img1.png").unlink()
    with pytest.raises(ConfigError, match="image 'img1.png' has no control image in control_folder 'before'"):
        build_dataset(job, lambda folder, key: str(tmp_path / folder))


def test_train_fp8_compute_sets_the_setting_and_must_be_a_boolean():
    assert parse_job(AI_TOOLKIT_FLUX, "x.yaml").settings.fp8_compute is False
    job = parse_job(edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(fp8_compute=True)), "x.yaml")
    assert job.settings.fp8_compute is True and "fp8_compute" not in (job.ignored_warning() or "")
    assert "train.fp8_compute must be true or false" in error_of(
        edited(AI_TOOLKIT_FLUX, lambda p: p["train"].update(fp8_compute="yes")))
