"""YAML training jobs in ai-toolkit's dialect, read into the engine's own settings objects.

    job: extension
    config:
      name: my_lora
      process:
        - type: sd_trainer
          training_folder: output          # <training_folder>/<name>/ holds adapters, samples, job.yaml
          trigger_word: ohwx
          network: {type: lora, linear: 16, linear_alpha: 16}
          model: {name_or_path: /models/sd3.5_medium.safetensors, arch: sd35}
          train: {batch_size: 1, steps: 2000, lr: 1e-4, optimizer: adamw8bit, dtype: bf16}
          datasets: [{folder_path: /data/me, caption_ext: txt, resolution: [512, 1024]}]
          save: {dtype: float16, save_every: 250, max_step_saves_to_keep: 4}
          sample: {sample_every: 250, prompts: ["[trigger] at the beach"], seed: 42, walk_seed: true}
    meta: {name: "[name]"}

A file written for ai-toolkit loads as it is. Its keys that EriDiffusion does not implement (hub upload,
loggers, token dropout, ...) are collected into ONE warning (`Job.ignored`) when they are set to anything but "off";
a key neither knows is a ConfigError naming its path and the closest known key. Defaults of ai-toolkit's
keys are ai-toolkit's (lr 1e-6, linear_alpha 1.0, dtype fp32, ...), so a job trains what it says there.
Nothing here imports ComfyUI.

A job can come from anyone who reaches ComfyUI's HTTP API, so reading one is bounded: the text is at most
1 MiB, YAML is loaded safely by a loader that refuses deep nesting and aliases that expand past a sane size
(a 640-byte "billion laughs" document is a graph of billions of values), every number is range-checked here
(not when training reaches it), and messages quote user values only cut short (`quoted`).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field

import yaml

from . import prompts as prompts_module
from .config import (CONTROL_PROMPTS, HUBER_SCHEDULES, MASKED_LOSS, MEMORY_BUDGET_MAX_GB, ConfigError, DatasetConfig,
                     TrainingSettings, quoted)

# flux_kontext: ComfyUI loads Flux.1 Kontext as Flux, qwen_image_edit (Qwen-Image-Edit) and qwen_image_edit_plus
# (2509 / 2511: captions as TextEncodeQwenImageEditPlus encodes them) as Qwen-Image; their datasets' control_path
# makes the edit pairs
ARCHES = {"sdxl": "sdxl", "sd3": "sd3", "sd35": "sd3", "sd3.5": "sd3", "flux": "flux", "flex1": "flux",
          "flux_kontext": "flux", "chroma": "chroma", "qwen_image": "qwen_image", "qwen_image_edit": "qwen_image",
          "qwen_image_edit_plus": "qwen_image",
          "flux2": "flux2", "zimage": "zimage"}
NETWORK_TYPES = {"lora": ("lora", False), "locon": ("lora", False), "dora": ("lora", True),
                 "lokr": ("lokr", False), "loha": ("loha", False)}
PRESETS = ("attention", "attention_mlp", "all_linear")
DTYPES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "full": "fp32", "bf16": "bf16", "bfloat16": "bf16",
          "fp16": "fp16", "float16": "fp16", "half": "fp16"}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "linear": "linear",
              "cosine": "cosine", "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial",
              "step": "step"}
# ai-toolkit's `optimizer:` values (and kohya's, lower-cased) -> ours
OPTIMIZER_NAMES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "adafactor": "adafactor", "prodigy": "prodigy",
                   "lion": "lion", "lion8bit": "lion8bit", "adamw_schedulefree": "adamw_schedulefree",
                   "adamwschedulefree": "adamw_schedulefree", "schedulefree": "adamw_schedulefree", "came": "came"}
# ai-toolkit's `loss_type` values (mae is its L1) and kohya's (l2)
LOSS_TYPE_NAMES = {"mse": "mse", "l2": "mse", "l1": "l1", "mae": "l1", "huber": "huber", "smooth_l1": "smooth_l1"}
# ai-toolkit's train.timestep_type -> (what t is drawn from, whether the schedule's shift applies), as
# toolkit/samplers/custom_flowmatch_sampler.py set_train_timesteps draws them for flow-matching models (σ = the
# timestep / 1000): sigmoid (its default) sigmoid(N(0, 1)); linear and weighted evenly from 1000 to 1 (weighted
# also weighs the loss, SDTrainer.py); shift / flux_shift evenly, then shifted as the model's sampler shifts;
# lognorm_blend (trainers/arch/base.py). Its DDPM models (SDXL) draw uniformly whatever timestep_type says.
AITK_TIMESTEP_TYPES = {"sigmoid": ("sigmoid", False), "linear": ("uniform", False), "weighted": ("uniform", False),
                       "lognorm_blend": ("lognorm_blend", False), "shift": ("uniform", True),
                       "flux_shift": ("uniform", True)}
AITK_UNSUPPORTED_TIMESTEP_TYPES = ("next_sample", "one_step", "two_step", "four_step", "eight_step",
                                   "lumina2_shift")
# EriDiffusion's own values: drawn as the canvas's Training settings draws them (then the model's own shift)
TIMESTEP_TYPES = {"uniform": "uniform", "logit_normal": "logit_normal", "lognorm": "logit_normal", "auto": "auto"}
# The process types of ai-toolkit that train a LoRA-style network (ui_trainer and diffusion_trainer are what its
# web UI writes; they add the UI's progress database to sd_trainer).
PROCESS_TYPES = ("sd_trainer", "diffusion_trainer", "ui_trainer")
# What ai-toolkit's other jobs and processes are, for the error that says they are not supported here.
OTHER_JOBS = {"train": "ai-toolkit's older special-purpose trainers (slider, vae, esrgan, ...)",
              "generate": "ai-toolkit's image generation job", "extract": "ai-toolkit's LoRA extraction job",
              "mod": "ai-toolkit's LoRA rescaling job", "merge": "ai-toolkit's model merging job"}
OTHER_PROCESSES = {"slider": "a concept slider", "concept_slider": "a concept slider",
                   "ultimate_slider_trainer": "a concept slider", "image_reference_slider_trainer": "a concept slider",
                   "textual_inversion_trainer": "a textual inversion (embedding)",
                   "vae": "a VAE", "esrgan": "an ESRGAN upscaler", "reference": "a reference adapter"}
NOISE_SCHEDULERS = {"ddpm": "sdxl", "euler": None, "euler_a": None, "flowmatch": "flow", "flow_match": "flow"}
# ai-toolkit's sample.sampler (diffusers names) -> (ComfyUI sampler, scheduler); other values are ComfyUI names.
SAMPLERS = {"flowmatch": ("euler", "simple"), "ddpm": ("ddpm", "normal"), "euler": ("euler", "normal"),
            "euler_a": ("euler_ancestral", "normal"), "ddim": ("ddim", "ddim_uniform"), "lms": ("lms", "normal"),
            "dpmsolver": ("dpmpp_2m", "karras"), "dpmsolver++": ("dpmpp_2m", "karras")}

_OFF = (None, False, 0, "", [], {})
# The budget ai-toolkit's layer_offloading and kohya's blocks_to_swap map to: below any model's training needs, so
# every layer ComfyUI can stream does (trainers/offload.py)
STREAM_ALL_BUDGET_GB = 0.1

# Bounds of what a job may be. ai-toolkit's jobs are a few kB with a few hundred values, nested 6 deep.
MAX_JOB_BYTES = 1 << 20            # text (characters) or file (bytes)
MAX_YAML_DEPTH = 64                # nested collections; PyYAML's composer recurses per level
MAX_YAML_VALUES = 20_000           # scalars and collections, counted with what each alias repeats (parsing up
                                   # to it blocks the server's event loop ~0.5 s at Queue; 100k took 2.3 s)
MAX_YAML_CHARACTERS = 4 << 20      # text of all scalars, aliases expanded (without aliases it is < MAX_JOB_BYTES)
MAX_NUMBER_DIGITS = 64             # longer integers are refused before Python converts them
MAX_NAME_BYTES = 100               # config.name names a folder and the files in it (+ a step and suffix)
IGNORED_QUOTE_LIMIT = 100          # per value in the ignored-keys warning (values there are usually a word)
# The trigger word replaces every [trigger] of every prompt and caption: bounded, it cannot multiply a 1 MiB
# job into gigabytes. A prompt is bounded as a caption is (DatasetConfig checks default_caption).
MAX_TRIGGER_LENGTH = 200
MAX_PROMPT_LENGTH = DatasetConfig.MAX_CAPTION_CHARS
MAX_PROMPTS = 1000                 # sample prompts: each is sampled every sample_every steps
SEED_MAX = 0xFFFFFFFF              # what the nodes' seed inputs accept
STEPS_MAX = 10_000_000             # train.steps, and the step counts measured in them
DEVICE = re.compile(r"(cpu|mps|(cuda|xpu)(:\d{1,3})?)")


def _neutral(*values):
    return _OFF + values


class _AnyValue:
    """Neutrals of a key that has no effect on image models whatever its value (video frame rates)."""


_ANY = _AnyValue()


# ai-toolkit keys EriDiffusion reads but does not implement, with the values that mean "off" there. Set to
# anything else, they are listed in Job.ignored. (Keys ai-toolkit has for other model families are unknown.)
AITK_IGNORED = {
    "process": {k: _OFF for k in ("performance_log_every", "logging", "log_dir", "embedding", "adapter",
                                  "decorator", "slider", "guidance", "print_config", "verbose",
                                  "sqlite_db_path")},
    "network": {"dropout": _OFF, "network_kwargs": _OFF, "normalize": _OFF, "lorm": _OFF,
                "transformer_only": _neutral(True), "split_multistage_loras": _neutral(True)},
    "model": {**{k: _OFF for k in (
        "low_vram", "vae_device", "te_device", "quantize_te", "text_encoder_bits", "te_name_or_path",
        "lora_path", "assistant_lora_path", "inference_lora_path", "attn_masking", "split_model_over_gpus",
        "compile", "model_kwargs", "quantize_kwargs", "ignore_if_contains", "only_if_contains", "use_flux_cfg",
        "experimental_xl", "latent_space_version", "refiner_name_or_path", "unet_path", "extras_name_or_path",
        "accuracy_recovery_adapter", "unconditional_lora_path", "block_compile",
        "compile_mode", "compile_fullgraph", "compile_dynamic", "cache_size_limit",
        "layer_offloading_text_encoder_percent")},
        "dtype": _neutral("bf16", "bfloat16", "fp16", "float16", "float32", "fp32"),
        "vae_dtype": _neutral("bf16", "bfloat16", "fp16", "float16", "float32", "fp32"),
        "te_dtype": _neutral("bf16", "bfloat16", "fp16", "float16", "float32", "fp32"),
        "qtype": _neutral("qfloat8"), "qtype_te": _neutral("qfloat8"),
        "use_text_encoder_1": _neutral(True), "use_text_encoder_2": _neutral(True)},
    "train": {**{k: _OFF for k in (
        "refiner_lr", "embedding_lr", "adapter_lr",
        "min_denoising_steps", "xformers", "sdp", "train_turbo",
        "learnable_snr_gos", "force_first_sample", "weight_jitter", "merge_network_on_save", "start_step",
        "free_u", "linear_timesteps", "linear_timesteps2", "unload_text_encoder", "cache_text_embeddings",
        "do_paramiter_swapping", "target_norm_std", "standardize_images",
        "standardize_latents", "dynamic_noise_offset", "do_cfg", "do_random_cfg", "correct_pred_norm",
        "prompt_dropout_prob", "match_noise_norm", "short_and_long_captions", "single_item_batching",
        "inverted_mask_prior", "adaptive_scaling_factor", "force_consistent_noise",
        "blended_blur_noise", "do_guidance_loss", "negative_prompt", "do_prior_divergence",
        "latent_feature_extractor_path", "diffusion_feature_extractor_path", "random_noise_shift",
        "random_noise_multiplier", "snr_gamma", "blank_prompt_preservation", "blank_prompt_preservation_multiplier",
        "do_differential_guidance", "differential_guidance_scale", "max_loss", "validation_config",
        "guidance_loss_target")},
        "audio_loss_multiplier": _neutral(1, 1.0),
        "max_denoising_steps": _neutral(999, 1000), "content_or_style": _neutral("balanced"),
        "train_refiner": _neutral(True), "noise_multiplier": _neutral(1, 1.0), "img_multiplier": _neutral(1, 1.0),
        "loss_target": _neutral("noise"),
        "num_train_timesteps": _neutral(1000), "optimal_noise_pairing_samples": _neutral(1),
        "switch_boundary_every": _neutral(1), "max_negative_prompts": _neutral(1),
        "target_noise_multiplier": _neutral(1, 1.0), "pred_scaler": _neutral(1, 1.0)},
    "datasets": {**{k: _OFF for k in (
        "dataset_path", "random_triggers", "random_scale", "random_crop", "token_dropout_rate",
        "flip_y", "augments", "poi",
        "cache_clip_vision_to_disk", "cache_text_embeddings", "standardize_images", "augmentations",
        "shuffle_augmentations", "square_crop", "controls", "fast_image_size", "invert_mask", "unconditional_path",
        "use_short_captions", "replacements", "clip_image_path", "inpaint_path", "random_triggers_max",
        "extra_values", "debug", "do_audio", "audio_normalize",
        "audio_preserve_pitch", "auto_frame_count", "control_path_1", "control_path_2", "control_path_3")},
        "type": _neutral("image"), "buckets": _neutral(True), "bucket_tolerance": _neutral(64),
        "scale": _neutral(1, 1.0), "network_weight": _neutral(1, 1.0), "loss_multiplier": _neutral(1, 1.0),
        "num_frames": _neutral(1), "fps": _ANY, "num_workers": _OFF + (1, 2, 4, 8),
        "prefetch_factor": _OFF + (2,), "caption_type": _OFF + ("txt", ".txt"),
        "full_size_control_images": _neutral(True), "replay_transforms": _neutral(True),
        "shrink_video_to_frames": _neutral(True), "do_i2v": _neutral(True)},
    # save_format diffusers applies to full models only (BaseSDTrainProcess.save): an adapter is one file either way
    "save": {"save_format": _neutral("safetensors", "diffusers"), "push_to_hub": _OFF, "hf_repo_id": _OFF,
             "hf_private": _OFF},
    "ema_config": {"use_feedback": _OFF, "param_multiplier": _neutral(1, 1.0)},
    "sample_item": {"network_multiplier": _neutral(1, 1.0), "ctrl_img": _OFF, "ctrl_idx": _OFF,
                    "num_frames": _neutral(1), "fps": _ANY},
    "sample": {"network_multiplier": _neutral(1, 1.0), "guidance_rescale": _OFF, "format": _OFF + ("jpg", "png"),
               "adapter_conditioning_scale": _neutral(1, 1.0), "refiner_start_at": _OFF + (0.5,),
               "extra_values": _OFF, "num_frames": _neutral(1), "fps": _ANY},
}

# Ignored keys that only tune another (its switch, or the path it needs): not worth a warning while that one is
# off. ai-toolkit's web UI writes them all, with their features off.
AITK_SUBKEYS = {
    "train": {"blank_prompt_preservation_multiplier": "blank_prompt_preservation",
              "differential_guidance_scale": "do_differential_guidance", "guidance_loss_target": "do_guidance_loss"},
    "model": {"qtype": "quantize", "qtype_te": "quantize_te", "quantize_kwargs": "quantize",
              "layer_offloading_text_encoder_percent": "layer_offloading", "block_compile": "compile",
              "compile_mode": "compile", "compile_fullgraph": "compile", "compile_dynamic": "compile",
              "cache_size_limit": "compile"},
    "datasets": {"random_triggers_max": "random_triggers"},
}


# ------------------------------------------------------------------------------------------------ the job
@dataclass(frozen=True)
class ModelJob:
    name_or_path: str = ""                  # checkpoint, or diffusion-model file (with text_encoder_paths, vae_path)
    arch: str = ""                          # sdxl / sd3 / flux / chroma / qwen_image / flux2 / zimage, or "": the MODEL's
    vae_path: str = ""
    text_encoder_paths: tuple[str, ...] = ()
    quantize: bool = False                  # fp8 (e4m3fn) weights for the diffusion model, bf16 compute
    v_pred: bool = False                    # is_v_pred: an SDXL v-prediction model (ModelSamplingDiscrete v_prediction)
    layer_offloading: bool = False          # ai-toolkit's layer_offloading: stream the weights (STREAM_ALL_BUDGET_GB)


@dataclass(frozen=True)
class NetworkJob:
    """What Create adapter takes (checkpoint.make_spec's arguments, less the MODEL)."""
    kind: str = "lora"
    rank: int = 16
    alpha: float = 1.0
    preset: str = "attention_mlp"
    seed: int = 0
    dtype: str = "fp32"
    dora: bool = False
    lokr_factor: int = -1
    lokr_full_w2: bool = False
    conv: bool = False
    conv_rank: int = 0
    conv_alpha: float = 0.0
    text_encoder: str = "none"              # train.train_text_encoder: clip_l+clip_g (CLIP-L alone on Flux)

    def make_spec_kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DatasetJob:
    folder_path: str
    configs: tuple[DatasetConfig, ...]      # one per resolution
    num_repeats: int = 1
    mask_path: str = ""                     # the folder of masks (masked_loss mask_folder)
    validation: bool = False                # held out: its loss is evaluated, it is not trained on
    control_path: str = ""                  # the folder of control images (edit pairs)


@dataclass(frozen=True)
class SaveJob:
    dtype: str = "fp16"
    save_every: int = 1000
    max_step_saves_to_keep: int = 5


@dataclass(frozen=True)
class SampleJob:
    prompts: tuple[str, ...]                # [trigger] already replaced
    negative: str = ""
    sample_every: int = 100
    sample_start_step: int = 0
    first_sample: bool = True               # also sample before training (ai-toolkit's skip_first_sample: false)
    seed: int = 0
    walk_seed: bool = False
    guidance_scale: float = 7.0
    sample_steps: int = 20
    width: int = 512
    height: int = 512
    sampler_name: str = "euler"
    scheduler: str = "normal"
    options: tuple = ()                     # trainers.prompts.PromptOptions of each prompt (negative as text)


@dataclass(frozen=True)
class Job:
    name: str
    source: str                             # file path or "<text>"
    training_folder: str
    device: str
    trigger_word: str
    model: ModelJob
    network: NetworkJob
    settings: TrainingSettings
    steps: int
    datasets: tuple[DatasetJob, ...]
    save: SaveJob
    sample: SampleJob | None
    meta: dict = field(default_factory=dict)
    ignored: tuple[str, ...] = ()           # "key.path: value" of ai-toolkit keys that have no effect here
    timestep_type: str = ""                 # ai-toolkit's train.timestep_type ("" when the job uses our own)
    explicit_shift: bool = False            # train.timestep_shift is given: it wins over timestep_type's shift
    arch_ignored: tuple[tuple[str, str], ...] = ()  # (arch, entry): keys that have an effect on that arch only
    validation_every: int = 100             # train.validate_every_n_steps (with a validation dataset)

    def for_arch(self, arch: str) -> "Job":
        """The job for a MODEL of `arch` (sdxl, sd3, flux, chroma, qwen_image, flux2, zimage): what ai-toolkit does
        per model family (timesteps, Flux's guidance bypass, no convolutions in a DiT) resolved, and the warning
        complete. A job whose model.arch is given was resolved when it was read."""
        if not arch or self.model.arch:
            return self
        return _resolved(self, arch)

    @property
    def save_prefix(self) -> str:
        """File-name prefix of the adapters under models/loras (the node) or the training folder."""
        return f"{self.name}/{self.name}"

    def ignored_warning(self) -> str | None:
        if not self.ignored:
            return None
        return (f"{self.source}: ignored (ai-toolkit settings EriDiffusion does not implement): "
                + "; ".join(self.ignored))


# --------------------------------------------------------------------------------------------- the reader
class _Section:
    """Typed reads from one mapping of the YAML; `done()` rejects keys nobody read."""

    def __init__(self, data, path: str, kind: str, ignored: list[str], source: str):
        self.path, self.kind, self.source, self.ignored = path, kind, source, ignored
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(f"{path} must be a mapping of keys to values, got {type(data).__name__} {quoted(data)}")
        self.data, self.read = data, set()

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        self.read.add(name)
        return self.data.get(name) is not None

    def raw(self, name: str, default=None):
        self.read.add(name)
        value = self.data.get(name)
        return default if value is None else value

    def int(self, name, default, lo=None, hi=None):
        value = self.raw(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"{self.key(name)} must be a whole number, got {quoted(value)}")
        self._range(name, value, lo, hi)
        return value

    def float(self, name, default, lo=None, hi=None):
        value = self.raw(name, default)
        if isinstance(value, str):      # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(f"{self.key(name)} must be a number, got {quoted(value)}")
        self._range(name, value, lo, hi)
        return float(value)

    def bool(self, name, default):
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(f"{self.key(name)} must be true or false, got {quoted(value)}")
        return value

    def str(self, name, default="", max_length=None):
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(f"{self.key(name)} must be text, got {quoted(value)}")
        value = str(value)
        if max_length is not None and len(value) > max_length:
            raise self.error(f"{self.key(name)} is {len(value):,} characters long; it may be at most "
                             f"{max_length:,}, got {quoted(value)}")
        return value

    def choice(self, name, default, choices: dict):
        value = self.str(name, default).strip()
        if value.lower() not in choices:
            raise self.error(f"{self.key(name)} must be one of {', '.join(choices)}, got {quoted(value)}")
        return choices[value.lower()]

    def str_list(self, name) -> tuple[str, ...]:
        value = self.raw(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{self.key(name)} must be a list of text, got {quoted(value)}")
        return tuple(value)

    def _range(self, name, value, lo, hi):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                      else f"at least {lo}" if lo is not None else f"at most {hi}")
            raise self.error(f"{self.key(name)} must be {bounds}, got {quoted(value)}")

    def done(self):
        ignorable = AITK_IGNORED.get(self.kind, {})
        for name, value in self.data.items():
            if name in self.read:
                continue
            if name in ignorable:
                switch = AITK_SUBKEYS.get(self.kind, {}).get(name)
                if switch is not None and _is_off(self.data.get(switch), _OFF):
                    continue
                if not _is_off(value, ignorable[name]):
                    self.ignored.append(f"{self.key(name)}: {quoted(value, IGNORED_QUOTE_LIMIT)}")
                continue
            known = sorted(self.read | set(ignorable))
            # no known key is near a name longer than the longest of them: match on its start only
            close = difflib.get_close_matches(str(name)[:64], known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise self.error(f"unknown key {quoted(self.key(str(name)))}{hint}")


def _is_off(value, neutrals) -> bool:
    """Whether an ignored key's value means "off" (then it is not worth a warning). A mapping is off when it
    has switches and all are false (ema_config: {use_ema: false, ema_decay: 0.99}), or, without switches, when
    all its values are off (network_kwargs: {ignore_if_contains: []})."""
    if neutrals is _ANY:
        return True
    if isinstance(value, dict) and value:
        switches = [v for v in value.values() if isinstance(v, bool)]
        if switches:
            return not any(switches)
        return all(_is_off(v, _OFF) for v in value.values())
    return any(type(value) is type(n) and value == n for n in neutrals)


# ----------------------------------------------------------------------------------------------- loading
def load_job(text_or_path: str, source: str | None = None) -> Job:
    """A Job from YAML text, or from a .yaml/.yml file path. Raises ConfigError naming the key at fault."""
    if _looks_like_path(text_or_path):
        path = os.path.abspath(os.path.expanduser(text_or_path.strip()))
        if not os.path.isfile(path):
            raise ConfigError(f"job file {quoted(text_or_path)} does not exist (looked for {quoted(path)})")
        return parse_job(read_job_file(path, text_or_path), source or path)
    return parse_job(text_or_path, source or "<job text>")


def _looks_like_path(text: str) -> bool:
    text = text.strip()
    return "\n" not in text and text.lower().endswith((".yaml", ".yml"))


def read_job_file(path: str, shown_as: str) -> str:
    """The text of a job file; a file larger than a job can be is refused before it is read."""
    try:
        size = os.path.getsize(path)
        if size <= MAX_JOB_BYTES:
            with open(path, "rb") as f:
                raw = f.read(MAX_JOB_BYTES + 1)      # the file may have grown since
            size = len(raw)
    except OSError as e:
        raise ConfigError(f"job file {quoted(shown_as)} cannot be read: {e.strerror}") from None
    if size > MAX_JOB_BYTES:
        raise ConfigError(f"job file {quoted(shown_as)} is {size:,} bytes; a job is at most {MAX_JOB_BYTES:,} "
                          f"bytes (1 MiB)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"job file {quoted(shown_as)} is not UTF-8 text (byte {e.start:,})") from None


def parse_job(text: str, source: str = "<job text>") -> Job:
    data = load_yaml(text, source)
    ignored: list[str] = []
    top = _Section(data, "", "top", ignored, source)
    job_type = top.str("job", "extension")
    if job_type != "extension":
        raise top.error(_other_job(job_type, data))
    meta = top.raw("meta", {})
    if not isinstance(meta, dict):
        raise top.error(f"meta must be a mapping, got {quoted(meta)}")
    config = _Section(top.raw("config"), "config", "config", ignored, source)
    top.done()
    name = config.str("name", "").strip()
    problem = _name_problem(name)
    if problem:
        raise config.error(f"config.name {problem}, got {quoted(name)}: it names the output folder and its files")
    processes = config.raw("process", [])
    config.done()
    if not isinstance(processes, list) or len(processes) != 1:
        raise config.error(f"config.process must be a list with one process (type: sd_trainer), got "
                           f"{len(processes) if isinstance(processes, list) else quoted(processes)}; put other "
                           f"processes in files of their own")
    job = _parse_process(_Section(processes[0], "config.process[0]", "process", ignored, source), name, source,
                         ignored)
    meta = {k: (v.replace("[name]", name) if isinstance(v, str) else v) for k, v in meta.items()}
    job = dataclasses.replace(job, meta=meta, ignored=tuple(ignored))
    if job.model.arch:
        return _resolved(job, job.model.arch)
    if job.timestep_type:   # until a MODEL resolves it: as on the flow-matching models ai-toolkit applies it to
        job = dataclasses.replace(job, settings=_aitk_timesteps(job.settings, job.timestep_type, "",
                                                                job.explicit_shift))
    return job


def _other_job(job_type: str, data: dict) -> str:
    """The error for a job that is not `job: extension`: what ai-toolkit would run, and that it is not
    supported here."""
    process = (data.get("config") or {}).get("process") if isinstance(data.get("config"), dict) else None
    first = process[0] if isinstance(process, list) and process and isinstance(process[0], dict) else {}
    kind = first.get("type") if isinstance(first.get("type"), str) else ""
    what = OTHER_PROCESSES.get(kind) and f"{OTHER_PROCESSES[kind]} trainer (config.process[0].type {quoted(kind)})"
    what = what or OTHER_JOBS.get(str(job_type))
    if not what:
        return f"job must be extension (ai-toolkit's training job), got {quoted(job_type)}"
    return (f"job {quoted(job_type)} is {what}, which EriDiffusion does not support: it trains LoRA, LoKr, LoHa "
            f"and DoRA adapters from jobs with job: extension and config.process[0].type "
            f"{' or '.join(PROCESS_TYPES[:2])}")


def _resolved(job: Job, arch: str) -> Job:
    """`job` for a MODEL of `arch` (see Job.for_arch)."""
    settings, network = job.settings, job.network
    ignored = list(job.ignored) + [entry for only, entry in job.arch_ignored if only == arch]
    if job.timestep_type:
        settings = _aitk_timesteps(settings, job.timestep_type, arch, job.explicit_shift)
    if network.conv and arch != "sdxl":     # ai-toolkit's web UI writes conv for every model
        ignored.append(f"config.process[0].network.conv: {network.conv_rank} ({arch} has no convolution layers to "
                       f"adapt; ai-toolkit ignores it there too)")
        network = dataclasses.replace(network, conv=False, conv_rank=0, conv_alpha=0.0)
    model = dataclasses.replace(job.model, arch=arch)
    return dataclasses.replace(job, settings=settings, network=network, model=model, ignored=tuple(ignored),
                               arch_ignored=())


def _aitk_timesteps(settings: TrainingSettings, timestep_type: str, arch: str, explicit_shift: bool):
    """The settings that draw timesteps as ai-toolkit draws `timestep_type` for `arch` (AITK_TIMESTEP_TYPES)."""
    if arch == "sdxl":      # BaseSDTrainProcess: timestep_type is read for flowmatch only; DDPM draws uniformly
        return dataclasses.replace(settings, timestep_sampling="auto", resolution_shift=False,
                                   timestep_shift=settings.timestep_shift if explicit_shift else 0.0)
    sampling, shifted = AITK_TIMESTEP_TYPES[timestep_type]
    changes = {"timestep_sampling": sampling}
    if not explicit_shift:
        if not shifted:
            changes.update(timestep_shift=1.0, resolution_shift=False)
        elif arch in ("sd3", "zimage"):     # toolkit/sampler.py sd_flow_config: shift 3.0, no dynamic shifting;
            # Z-Image's scheduler_config (extensions_built_in/diffusion_models/z_image) is the same
            changes.update(timestep_shift=3.0, resolution_shift=False)
        else:                   # flux_config: dynamic shifting by the latent's size, for dev and schnell alike,
            # and Chroma's and Flux.2's scheduler_config (extensions_built_in/diffusion_models/chroma, flux2) is
            # the same (Flux.2's 16×16-pixel tokens count as Flux.1's 2×2 patches of 8×8); Qwen-Image's
            # (extensions_built_in/diffusion_models/qwen_image) shifts by size too, with its own range (arch.qwen_image)
            changes.update(timestep_shift=0.0, resolution_shift=True)
    return dataclasses.replace(settings, **changes)


def _name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder and files (<name>/<name>_000250.safetensors, samples), or None."""
    if not name:
        return "is required: a plain name such as my_lora"
    if any(unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" for c in name):
        return "must not contain control or invisible characters (such as NUL or a line break)"
    if any(c in name for c in "/\\") or name in (".", ".."):
        return "must be a plain name, without / or \\ and not . or .."
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is {len(name.encode()):,} bytes long (UTF-8); it may be at most {MAX_NAME_BYTES}"
    return None


# ------------------------------------------------------------------------------------------------ bounded YAML
def load_yaml(text: str, source: str):
    """The data of a job's YAML text, read safely (no Python objects) within MAX_JOB_BYTES, MAX_YAML_DEPTH,
    MAX_YAML_VALUES and MAX_YAML_CHARACTERS. Any failure is a ConfigError of a few hundred characters."""
    if len(text) > MAX_JOB_BYTES:
        raise ConfigError(f"{source}: the job is {len(text):,} characters long; a job is at most "
                          f"{MAX_JOB_BYTES:,} (1 MiB)")
    try:
        return yaml.load(text, Loader=_BoundedLoader)   # noqa: S506 (a SafeLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:      # not expected below MAX_YAML_DEPTH; never let it out raw
        raise ConfigError(f"{source}: the job's YAML is nested too deeply to read") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_cut(str(e))}") from None
    except Exception as e:      # noqa: BLE001 -- PyYAML's constructors fail raw on values that do not fit an
        # explicit tag: `!!int abc` (ValueError), `!!timestamp x` (AttributeError), ...
        raise ConfigError(f"{source}: not valid YAML: a value does not fit its tag ({type(e).__name__}: "
                          f"{_cut(str(e))})") from None


def _cut(text: str, limit: int = 600) -> str:
    """PyYAML's messages quote anchors and tags whole (%r) and show a line of context: keep their start."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses documents nested deeper than MAX_YAML_DEPTH, and documents whose
    values, with each alias counted as everything its anchor holds, pass MAX_YAML_VALUES or
    MAX_YAML_CHARACTERS: the data an alias repeats is shared when it is built, but anything that walks it
    (a message, a check, a copy) walks every repetition."""

    def __init__(self, stream):
        super().__init__(stream)
        self.nesting = 0
        self.expanded_values = 0
        self.expanded_characters = 0
        self.aliased = False
        self.anchor_sizes: dict[str, tuple[int, int]] = {}   # anchor -> (values, characters) it expands to
        self.open_anchors: set[str] = set()                   # anchors of the collections being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                # `&a [*a]` is a value that contains itself: anything walking it never ends
                raise ConfigError(f"the job's YAML has an alias inside the value it refers to (line {line}): "
                                  f"write the values out")
            values, characters = self.anchor_sizes.get(event.anchor, (0, 0))   # unknown: PyYAML's error
            self.aliased = True
            self._count(values, characters, line)
            return super().compose_node(parent, index)
        self.nesting += 1
        if self.nesting > MAX_YAML_DEPTH:
            raise ConfigError(f"the job's YAML is nested more than {MAX_YAML_DEPTH} levels deep (line {line})")
        start = (self.expanded_values, self.expanded_characters)
        self._count(1, len(event.value) if isinstance(event, yaml.ScalarEvent) else 0, line)
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self.open_anchors.discard(event.anchor)
            self.anchor_sizes[event.anchor] = (self.expanded_values - start[0], self.expanded_characters - start[1])
        self.nesting -= 1
        return node

    def _count(self, values: int, characters: int, line: int) -> None:
        self.expanded_values += values
        self.expanded_characters += characters
        if self.expanded_values > MAX_YAML_VALUES:
            if self.aliased:
                raise ConfigError(f"the job's YAML aliases expand to more than {MAX_YAML_VALUES:,} values "
                                  f"(line {line}): write the values out")
            raise ConfigError(f"the job's YAML has more than {MAX_YAML_VALUES:,} values (line {line}); a job has "
                              f"a few hundred")
        if self.expanded_characters > MAX_YAML_CHARACTERS:
            raise ConfigError(f"the job's YAML aliases expand to more than {MAX_YAML_CHARACTERS:,} characters of "
                              f"text (line {line}): write the values out")

    def construct_yaml_int(self, node):
        # int() of a long decimal raises a raw ValueError, and a long hexadecimal becomes a number whose
        # repr raises one in every message that quotes it
        if len(node.value) > MAX_NUMBER_DIGITS:
            raise ConfigError(f"the number on line {node.start_mark.line + 1} is {len(node.value):,} characters "
                              f"long; a number in a job has at most {MAX_NUMBER_DIGITS}")
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _parse_process(p: _Section, name: str, source: str, ignored: list[str]) -> Job:
    kind = p.str("type", "sd_trainer")
    if kind in OTHER_PROCESSES:
        raise p.error(f"{p.key('type')} {quoted(kind)} is {OTHER_PROCESSES[kind]} trainer, which EriDiffusion does "
                      f"not support: it trains LoRA, LoKr, LoHa and DoRA adapters (type: sd_trainer or "
                      f"diffusion_trainer)")
    if kind not in PROCESS_TYPES:
        raise p.error(f"{p.key('type')} must be one of {', '.join(PROCESS_TYPES)} (ai-toolkit's adapter trainers), "
                      f"got {quoted(kind)}")
    training_folder = p.str("training_folder", "output")
    device = p.str("device", "cuda:0").strip().lower()
    if not DEVICE.fullmatch(device):
        raise p.error(f"{p.key('device')} must be cpu, cuda or cuda:N (mps, xpu[:N]), got {quoted(device)}")
    trigger = p.str("trigger_word", "", max_length=MAX_TRIGGER_LENGTH)
    cpu_offload = p.bool("cpu_offload", False)

    sub = lambda key, kind: _Section(p.raw(key), p.key(key), kind, ignored, source)  # noqa: E731
    has_network = p.has("network")
    model = _parse_model(sub("model", "model"))
    network = _parse_network(sub("network", "network"))
    train = sub("train", "train")
    datasets_raw = p.raw("datasets", [])
    if not isinstance(datasets_raw, list):
        raise p.error(f"{p.key('datasets')} must be a list of datasets (- folder_path: ...), got "
                      f"{quoted(datasets_raw)}")
    model_raw = p.raw("model", {})
    plus = isinstance(model_raw, dict) and str(model_raw.get("arch", "")).strip().lower() == "qwen_image_edit_plus"
    prompt = CONTROL_PROMPTS[1] if plus else CONTROL_PROMPTS[0]
    datasets = [_parse_dataset(_Section(d, f"{p.key('datasets')}[{i}]", "datasets", ignored, source), trigger,
                               prompt) for i, d in enumerate(datasets_raw)]
    # caption_dropout_rate is each dataset's own (DatasetConfig.caption_dropout)
    validation_every = train.int("validate_every_n_steps", 100, lo=1, hi=STEPS_MAX)   # kohya's name
    settings, steps, first_sample, sampling_on, timesteps, dop_class = _parse_train(train, model.arch, 0.0,
                                                                                     cpu_offload,
                                                                                     model.layer_offloading)
    if settings.diff_output_preservation:
        datasets = _with_preservation_class(train, datasets, dop_class)
    if timesteps.pop("train_text_encoder"):
        if model.arch == "qwen_image":
            raise train.error(f"{train.key('train_text_encoder')}: training Qwen-Image's text encoder (Qwen2.5-VL) "
                              f"is not supported; remove it or set it to false")
        if model.arch == "flux2":
            raise train.error(f"{train.key('train_text_encoder')}: Flux.2's text encoder (Mistral 3 Small, 24B) gets "
                              f"no adapter here; set it to false")
        if model.arch == "zimage":
            raise train.error(f"{train.key('train_text_encoder')}: training Z-Image's text encoder (Qwen3-4B) is not "
                              f"supported; set it to false")
        network = dataclasses.replace(network, text_encoder="clip_l+clip_g")
    save = _parse_save(sub("save", "save"))
    sample_section = sub("sample", "sample")
    sample = _parse_sample(sample_section, trigger, first_sample, model.arch)
    p.done()
    if not has_network:
        raise p.error(f"{p.path} has no network section: ai-toolkit then fine-tunes the whole model, which "
                      f"EriDiffusion does not support (it trains adapters); add network: {{type: lora, linear: 16, "
                      f"linear_alpha: 16}}")
    return Job(name=name.strip(), source=source, training_folder=training_folder, device=device,
               trigger_word=trigger, model=model, network=network, settings=settings, steps=steps,
               datasets=tuple(datasets), save=save, sample=sample if sampling_on else None,
               validation_every=validation_every, **timesteps)


def _parse_model(m: _Section) -> ModelJob:
    arch = m.str("arch", "").strip().lower().split(":")[0]
    flags = [a for a, key in (("sdxl", "is_xl"), ("sd3", "is_v3"), ("flux", "is_flux")) if m.bool(key, False)]
    for key, family in (("is_v2", "SD 2"), ("is_pixart", "PixArt"), ("is_pixart_sigma", "PixArt-Σ"),
                        ("is_auraflow", "AuraFlow"), ("is_lumina2", "Lumina 2"), ("is_ssd", "SSD-1B"),
                        ("is_vega", "Vega")):
        if m.bool(key, False):
            raise m.error(f"{m.key(key)}: {family} is not supported; EriDiffusion trains SDXL, SD 3.5, Flux, "
                          f"Chroma, Qwen-Image, Flux.2 and Z-Image")
    if arch:
        if arch not in ARCHES:
            raise m.error(f"{m.key('arch')} must be one of sdxl, sd35 (or sd3), flux (or flux_kontext), chroma, "
                          f"qwen_image (or qwen_image_edit, qwen_image_edit_plus), flux2, zimage, got {quoted(arch)}")
        arch = ARCHES[arch]
    if len(set(flags)) > 1 or (arch and flags and flags[0] != arch):
        raise m.error(f"{m.path}: arch and the is_xl / is_v3 / is_flux flags name different architectures "
                      f"({', '.join(filter(None, [arch, *flags]))}); keep one")
    arch = arch or (flags[0] if flags else "")
    v_pred = m.bool("is_v_pred", False)
    if v_pred and arch in ("sd3", "flux", "chroma", "qwen_image", "flux2", "zimage"):
        raise m.error(f"{m.key('is_v_pred')}: {arch} is a flow-matching model (no v-prediction); is_v_pred applies "
                      f"to SDXL: remove it")
    model = ModelJob(name_or_path=m.str("name_or_path", ""), arch=arch, vae_path=m.str("vae_path", ""),
                     text_encoder_paths=m.str_list("text_encoder_paths"), quantize=m.bool("quantize", False),
                     v_pred=v_pred, layer_offloading=_layer_offloading(m))
    m.done()
    return model


def _layer_offloading(m: _Section) -> bool:
    """ai-toolkit's model.layer_offloading with layer_offloading_transformer_percent (its share of the transformer's
    layers kept in CPU memory, 1.0 by default): EriDiffusion streams by a GPU memory budget instead, and maps the
    switch to the smallest one (every layer streams); another share is listed among the ignored keys."""
    on = m.bool("layer_offloading", False)
    share = m.float("layer_offloading_transformer_percent", 1.0, lo=0.0, hi=1.0)
    if on and 0.0 < share < 1.0:
        m.ignored.append(f"{m.key('layer_offloading_transformer_percent')}: {share:g} (every layer streams; "
                         f"set train.memory_budget_gb in GiB to keep some on the GPU)")
    return on and share > 0.0


def _parse_network(n: _Section) -> NetworkJob:
    kind, dora = n.choice("type", "lora", {k: v for k, v in NETWORK_TYPES.items()})
    dora = n.bool("dora", dora) or n.bool("dora_wd", False)
    if n.has("rank") and n.has("linear") and n.raw("rank") != n.raw("linear"):
        raise n.error(f"{n.key('rank')} and {n.key('linear')} are the same setting; keep one")
    rank = n.int("linear", n.int("rank", 16, lo=1, hi=4096), lo=1, hi=4096)
    alpha = n.float("linear_alpha", n.float("alpha", 1.0, lo=0.0), lo=0.0)
    conv = n.int("conv", 0, lo=0, hi=4096)
    conv_alpha = n.float("conv_alpha", float(conv), lo=0.0)
    lokr_factor = n.int("lokr_factor", -1, lo=-1, hi=1024)
    if lokr_factor == 0:
        raise n.error(f"{n.key('lokr_factor')} must be -1 (automatic) or a positive number, got 0")
    preset = n.choice("target", "attention_mlp", {p: p for p in PRESETS})
    spec = NetworkJob(kind=kind, rank=rank, alpha=alpha, preset=preset, seed=n.int("seed", 0, lo=0, hi=SEED_MAX),
                      dtype=n.choice("dtype", "fp32", {"fp32": "fp32", "float32": "fp32", "bf16": "bf16",
                                                       "bfloat16": "bf16"}),
                      dora=dora, lokr_factor=lokr_factor, lokr_full_w2=n.bool("lokr_full_rank", False),
                      conv=conv > 0, conv_rank=conv, conv_alpha=conv_alpha if conv else 0.0)
    n.done()
    return spec


def _parse_dataset(d: _Section, trigger: str, control_prompt: str = CONTROL_PROMPTS[0]) -> DatasetJob:
    folder = d.str("folder_path", "")
    if not folder.strip():
        raise d.error(f"{d.key('folder_path')} is required: the folder of training images with their captions")
    ext = d.str("caption_ext", ".txt").strip() or ".txt"
    ext = ext if ext.startswith(".") else "." + ext
    resolution = d.raw("resolution", 512)
    resolutions = resolution if isinstance(resolution, list) else [resolution]
    if not resolutions or not all(isinstance(r, int) and not isinstance(r, bool) for r in resolutions):
        raise d.error(f"{d.key('resolution')} must be a number or a list of numbers, got {quoted(resolution)}")
    for r in resolutions:
        if r % 64 or not 64 <= r <= 4096:
            raise d.error(f"{d.key('resolution')}: {quoted(r)} is not a multiple of 64 between 64 and 4096")
    dropout = d.float("caption_dropout_rate", 0.0, lo=0.0, hi=1.0)
    d.bool("cache_latents_to_disk", False)      # latents are always cached on disk
    d.bool("cache_latents", False)
    common = dict(folder=folder, default_caption=d.str("default_caption", ""),
                  trigger_word=d.str("trigger_word", trigger, max_length=MAX_TRIGGER_LENGTH),
                  flip=d.bool("flip_x", False), caption_ext=ext)
    common.update(shuffle_captions=d.bool("shuffle_tokens", False), keep_tokens=d.int("keep_tokens", 0, lo=0, hi=1000),
                  caption_variants=d.int("caption_variants", 4, lo=1, hi=DatasetConfig.MAX_CAPTION_VARIANTS),
                  caption_dropout=dropout, is_reg=d.bool("is_reg", False))
    repeats = d.int("num_repeats", 1, lo=1, hi=10000)
    # masked loss: ai-toolkit's alpha_mask / mask_path / mask_min_value, or masked_loss as the node has it
    mask_path = d.str("mask_path", "")
    masked = "mask_folder" if mask_path.strip() else "alpha" if d.bool("alpha_mask", False) else "off"
    if isinstance(d.raw("masked_loss"), bool):   # kohya's switch: the masks of mask_path, else the alpha channel
        masked = masked if masked != "off" or not d.raw("masked_loss") else "alpha"
        masked = masked if d.raw("masked_loss") else "off"
    else:
        masked = d.choice("masked_loss", masked, {m: m for m in MASKED_LOSS})
    if masked == "mask_folder" and not mask_path.strip():
        raise d.error(f"{d.key('masked_loss')} mask_folder needs {d.key('mask_path')}: the folder of masks")
    common.update(masked_loss=masked, mask_folder=mask_path,
                  mask_min_value=d.float("mask_min_value", 0.0, lo=0.0, hi=1.0))
    control_path = d.str("control_path", "")    # edit pairs: a control image of each image's name
    common.update(control_folder=control_path, control_prompt=control_prompt)
    validation = d.bool("validation", False)    # EriDiffusion's own: a held-out set
    d.done()
    try:
        configs = tuple(DatasetConfig(resolution=r, min_side=min(256, r), max_side=max(2048, r), **common)
                        for r in dict.fromkeys(resolutions))
    except ConfigError as e:    # DatasetConfig checks its own fields (caption_ext): report the job's key
        field_name = re.search(r"\b(caption_ext|default_caption|trigger_word|resolution)\b", str(e))
        raise d.error(f"{d.key(field_name[1])}: {e}" if field_name else f"{d.path}: {e}") from None
    return DatasetJob(folder, configs, repeats, mask_path, validation, control_path)


def _parse_train(t: _Section, arch: str, caption_dropout: float, cpu_offload: bool, layer_offloading: bool = False):
    steps = t.int("steps", 1000, lo=1, hi=STEPS_MAX)
    if not t.bool("train_unet", True):
        raise t.error(f"{t.key('train_unet')}: false would train nothing (EriDiffusion trains an adapter on the "
                      f"diffusion model); remove it")
    lr = t.float("lr", 1e-6, lo=0.0)
    lr = t.float("unet_lr", lr, lo=0.0)
    if lr <= 0:
        raise t.error(f"{t.key('lr')} must be positive, got {lr}")
    optimizer = t.str("optimizer", "adamw").strip().lower()
    if optimizer not in OPTIMIZER_NAMES:
        close = difflib.get_close_matches(optimizer, OPTIMIZER_NAMES, n=1)
        raise t.error(f"{t.key('optimizer')} {quoted(optimizer)} is not available; choose one of "
                      f"{', '.join(OPTIMIZER_NAMES)}"
                      + (f" (closest: {close[0]})" if close else ""))
    optimizer = OPTIMIZER_NAMES[optimizer]
    if optimizer == "prodigy" and lr < 0.1:
        # ai-toolkit does the same: Prodigy's lr multiplies the step size it finds (1.0 is its recommended value)
        logging.warning("EriDiffusion: %s is %g with optimizer prodigy; training at 1.0, as ai-toolkit does",
                        t.key("lr"), lr)
        lr = 1.0
    schedule = t.choice("lr_scheduler", "constant", SCHEDULERS)
    schedule_kw = _parse_schedule_params(t)
    accumulation = t.int("gradient_accumulation_steps", 1, lo=1, hi=100_000)
    accumulation = t.int("gradient_accumulation", accumulation, lo=1, hi=100_000)
    noise_scheduler = t.choice("noise_scheduler", "ddpm" if arch in ("sdxl", "") else "flowmatch",
                               NOISE_SCHEDULERS)
    if arch and noise_scheduler and (noise_scheduler == "sdxl") != (arch == "sdxl"):
        raise t.error(f"{t.key('noise_scheduler')} {quoted(t.raw('noise_scheduler'))} does not fit {arch}: use "
                      f"{'ddpm' if arch == 'sdxl' else 'flowmatch'} (training uses the model's own objective)")
    timestep_type, timestep, loss_weighting = _parse_timestep_type(t)
    params = t.raw("optimizer_params", {})
    if not isinstance(params, dict):
        raise t.error(f"{t.key('optimizer_params')} must be a mapping (weight_decay: ...), got {quoted(params)}")
    weight_decay = _Section({"weight_decay": params.get("weight_decay")}, t.key("optimizer_params"), "", [],
                            t.source).float("weight_decay", t.float("weight_decay", 0.01, lo=0.0), lo=0.0)
    others = {k: v for k, v in params.items() if k != "weight_decay"}
    if others:      # one entry, however many keys: each would be a line of the warning
        t.ignored.append(f"{t.key('optimizer_params')}: {quoted(others, IGNORED_QUOTE_LIMIT)}")
    settings_kw = dict(
        optimizer=optimizer, learning_rate=lr, schedule=schedule, **schedule_kw,
        loss_type=t.choice("loss_type", "mse", LOSS_TYPE_NAMES),
        huber_schedule=t.choice("huber_schedule", "snr", {h: h for h in HUBER_SCHEDULES}),
        huber_c=t.float("huber_c", 0.1, lo=1e-6, hi=1.0), huber_scale=t.float("huber_scale", 1.0, lo=1e-6),
        warmup_steps=t.int("warmup_steps", 0, lo=0, hi=STEPS_MAX), weight_decay=weight_decay,
        max_grad_norm=t.float("max_grad_norm", 1.0, lo=0.0), batch_size=t.int("batch_size", 1, lo=1, hi=4096),
        grad_accumulation=accumulation, precision=t.choice("dtype", "fp32", DTYPES),
        gradient_checkpointing=t.bool("gradient_checkpointing", True), seed=t.int("seed", 0, lo=0, hi=SEED_MAX),
        noise_offset=t.float("noise_offset", 0.0, lo=0.0, hi=1.0),
        min_snr_gamma=t.float("min_snr_gamma", 0.0, lo=0.0), caption_dropout=caption_dropout,
        timestep_sampling=timestep, logit_mean=t.float("logit_mean", 0.0),
        logit_std=t.float("logit_std", 1.0, lo=1e-6), sigmoid_scale=t.float("sigmoid_scale", 1.0, lo=1e-6),
        timestep_shift=t.float("timestep_shift", 0.0, lo=0.0),
        loss_weighting=loss_weighting,
        flux_guidance=t.float("flux_guidance", 1.0, lo=0.0),
        nan_policy=t.choice("nan_policy", "stop", {"stop": "stop", "skip": "skip"}),
        compile=t.choice("compile", "cuda_graphs", {"cuda_graphs": "cuda_graphs", "off": "off"}),
        recompute_attention=t.bool("recompute_attention", False),
        recompute_layers=t.bool("recompute_layers", True),
        checkpoint_fraction=t.float("checkpoint_fraction", 1.0, lo=0.0, hi=1.0),
        optimizer_offload=t.bool("cpu_offload", cpu_offload) or t.bool("optimizer_offload", False),
        reg_weight=_reg_weight(t),
        diff_output_preservation=t.bool("diff_output_preservation", False),
        diff_output_preservation_multiplier=t.float("diff_output_preservation_multiplier", 1.0, lo=0.0, hi=1000.0),
        # ai-toolkit's text_encoder_lr defaults to lr, as 0 does here
        text_encoder_lr=t.float("text_encoder_lr", 0.0, lo=0.0, hi=1.0),
        memory_budget_gb=_memory_budget(t, layer_offloading),
        # ours (ai-toolkit has none: its model.quantize / qtype qfloat8 store weights in 8 bits, compute in bf16)
        fp8_compute=t.bool("fp8_compute", False))
    dop_class = t.str("diff_output_preservation_class", "", max_length=MAX_TRIGGER_LENGTH).strip()
    settings_kw.update(_parse_ema(_Section(t.raw("ema_config"), t.key("ema_config"), "ema_config", t.ignored,
                                           t.source)))
    first_sample = not t.bool("skip_first_sample", False)
    sampling_on = not t.bool("disable_sampling", False)
    timesteps = {"timestep_type": timestep_type, "explicit_shift": t.has("timestep_shift"),
                 "arch_ignored": (("flux", f"{t.key('bypass_guidance_embedding')}: True"),)
                 if t.bool("bypass_guidance_embedding", False) else (),   # ai-toolkit bypasses it on Flux only
                 "train_text_encoder": t.bool("train_text_encoder", False)}
    t.done()
    try:
        settings = TrainingSettings(**settings_kw)
    except ConfigError as e:
        raise t.error(f"{t.path}: {e}") from None
    return settings, steps, first_sample, sampling_on, timesteps, dop_class


def _memory_budget(t: _Section, layer_offloading: bool) -> float:
    """train.memory_budget_gb (ours, GiB); else ai-toolkit's model.layer_offloading or kohya's blocks_to_swap (a
    count of blocks swapped, any above 0), which both map to the smallest budget: every layer streams."""
    swapped = t.int("blocks_to_swap", 0, lo=0, hi=10_000)
    default = STREAM_ALL_BUDGET_GB if layer_offloading or swapped else 0.0
    return t.float("memory_budget_gb", default, lo=0.0, hi=MEMORY_BUDGET_MAX_GB)


def _reg_weight(t: _Section) -> float:
    """ai-toolkit's train.reg_weight, or kohya's name for it, prior_loss_weight."""
    if t.has("reg_weight") and t.has("prior_loss_weight") and t.raw("reg_weight") != t.raw("prior_loss_weight"):
        raise t.error(f"{t.key('reg_weight')} and {t.key('prior_loss_weight')} are the same setting; keep one")
    return t.float("reg_weight", t.float("prior_loss_weight", 1.0, lo=0.0, hi=1000.0), lo=0.0, hi=1000.0)


def _with_preservation_class(t: _Section, datasets: list[DatasetJob], dop_class: str) -> list[DatasetJob]:
    """The datasets of training images (not is_reg) with train.diff_output_preservation_class as the class word
    that replaces their trigger word (DatasetConfig.preservation_class): their class captions are cached too."""
    if not dop_class:
        raise t.error(f"{t.key('diff_output_preservation')} needs {t.key('diff_output_preservation_class')}: the "
                      f"class word the trigger word stands for (person, dog, ...), which replaces it in the "
                      f"captions the adapter is kept from changing")
    out = []
    for i, d in enumerate(datasets):
        if d.configs[0].is_reg:
            out.append(d)
            continue
        if not d.configs[0].trigger_word.strip():
            raise t.error(f"{t.key('diff_output_preservation')} replaces the trigger word in the captions, and "
                          f"datasets[{i}] has none: set config.process[0].trigger_word (or the dataset's "
                          f"trigger_word), or turn diff_output_preservation off")
        out.append(dataclasses.replace(d, configs=tuple(dataclasses.replace(c, preservation_class=dop_class)
                                                        for c in d.configs)))
    return out


def _parse_timestep_type(t: _Section) -> tuple[str, str, str]:
    """(ai-toolkit's timestep_type or "", our timestep_sampling, loss_weighting) of the train section. ai-toolkit's
    types are resolved per architecture when the job's model is known (_aitk_timesteps); left out, the type is
    ai-toolkit's default, sigmoid."""
    value = t.str("timestep_type", "sigmoid").strip().lower()
    if value in AITK_UNSUPPORTED_TIMESTEP_TYPES:
        raise t.error(f"{t.key('timestep_type')} {quoted(value)} is not supported; choose one of "
                      f"{', '.join(AITK_TIMESTEP_TYPES)} (ai-toolkit's) or {', '.join(TIMESTEP_TYPES)}")
    if value not in AITK_TIMESTEP_TYPES and value not in TIMESTEP_TYPES:
        raise t.error(f"{t.key('timestep_type')} must be one of {', '.join(AITK_TIMESTEP_TYPES)} (ai-toolkit's) or "
                      f"{', '.join(TIMESTEP_TYPES)}, got {quoted(value)}")
    weighting = t.choice("loss_weighting", "none", {w: w for w in ("none", "sigma_sqrt", "cosmap")})
    if value == "weighted":
        if weighting != "none":
            raise t.error(f"{t.key('timestep_type')} weighted weighs the loss per timestep itself; remove "
                          f"{t.key('loss_weighting')} ({quoted(weighting)}) or choose another timestep_type")
        weighting = "weighted"
    if value in AITK_TIMESTEP_TYPES:
        return value, AITK_TIMESTEP_TYPES[value][0], weighting
    return "", TIMESTEP_TYPES[value], weighting


def _parse_schedule_params(t: _Section) -> dict:
    """TrainingSettings' schedule fields from `lr_scheduler_params` (diffusers' num_cycles and power, torch
    StepLR's step_size and gamma); its other keys go to the ignored-keys warning, as one entry."""
    params = t.raw("lr_scheduler_params", {})
    if not isinstance(params, dict):
        raise t.error(f"{t.key('lr_scheduler_params')} must be a mapping (num_cycles: ...), got {quoted(params)}")
    p = _Section(params, t.key("lr_scheduler_params"), "", [], t.source)
    values = dict(schedule_cycles=p.int("num_cycles", 1, lo=1, hi=100_000),
                  schedule_power=p.float("power", 1.0, lo=1e-3, hi=100.0),
                  schedule_step_size=p.int("step_size", 0, lo=0, hi=STEPS_MAX),
                  schedule_gamma=p.float("gamma", 0.1, lo=1e-6, hi=1.0))
    others = {k: v for k, v in params.items() if k not in p.read}
    if others:
        t.ignored.append(f"{t.key('lr_scheduler_params')}: {quoted(others, IGNORED_QUOTE_LIMIT)}")
    return values


def _parse_ema(e: _Section) -> dict:
    """ai-toolkit's train.ema_config (use_ema, ema_decay; ema_every and ema_on_cpu are ours) as settings."""
    values = dict(ema=e.bool("use_ema", False), ema_decay=e.float("ema_decay", 0.999, lo=0.0, hi=1.0),
                  ema_every=e.int("ema_every", 1, lo=1, hi=1_000_000), ema_on_cpu=e.bool("ema_on_cpu", False))
    if values["ema"] and not 0.0 < values["ema_decay"] < 1.0:
        raise e.error(f"{e.key('ema_decay')} must be between 0 and 1 (0.999 is common), got {values['ema_decay']}")
    e.done()
    return values


def _parse_save(s: _Section) -> SaveJob:
    save = SaveJob(dtype=s.choice("dtype", "float16", DTYPES), save_every=s.int("save_every", 1000, lo=1, hi=STEPS_MAX),
                   max_step_saves_to_keep=s.int("max_step_saves_to_keep", 5, lo=1, hi=100_000))
    s.done()
    return save


def _parse_sample(s: _Section, trigger: str, first_sample: bool, arch: str) -> SampleJob | None:
    entries = [(prompt, {}) for prompt in s.str_list("prompts")]
    samples = s.raw("samples", [])
    if not isinstance(samples, list):
        raise s.error(f"{s.key('samples')} must be a list of {{prompt: ...}}, got {quoted(samples)}")
    for i, item in enumerate(samples):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise s.error(f"{s.key('samples')}[{i}] must be a mapping with a prompt, got {quoted(item)}")
        entries.append((item["prompt"], item))
    if len(entries) > MAX_PROMPTS:
        raise s.error(f"{s.key('prompts')}: {len(entries):,} prompts (with samples); at most {MAX_PROMPTS:,} are "
                      f"sampled")
    for i, (prompt, _) in enumerate(entries):    # measured before [trigger] is replaced: the replacing multiplies
        length = len(prompt) + prompt.count("[trigger]") * (len(trigger) - len("[trigger]"))
        if length > MAX_PROMPT_LENGTH:
            raise s.error(f"{s.key('prompts')}: prompt {i} is {length:,} characters long (with the trigger word); "
                          f"a prompt may be at most {MAX_PROMPT_LENGTH:,}, got {quoted(prompt)}")
    neg = s.raw("neg", "")
    if neg is False:            # ai-toolkit's default
        neg = ""
    if not isinstance(neg, str):
        raise s.error(f"{s.key('neg')} must be text (the negative prompt), got {quoted(neg)}")
    if len(neg) > MAX_PROMPT_LENGTH:
        raise s.error(f"{s.key('neg')} is {len(neg):,} characters long; it may be at most {MAX_PROMPT_LENGTH:,}")
    seed, walk_seed = s.int("seed", 0, lo=0, hi=SEED_MAX), s.bool("walk_seed", False)
    prompts, options = [], []
    for i, (prompt, item) in enumerate(entries):
        key = f"{s.key('samples')}[{i - (len(entries) - len(samples))}]" if item else f"{s.key('prompts')}[{i}]"
        text, option = _prompt_options(s, key, prompt, item, arch)
        if walk_seed and option.seed is None:   # ai-toolkit: prompt i samples with seed + i, every round
            option = dataclasses.replace(option, seed=(seed + i) % (SEED_MAX + 1))
        prompts.append(_inject_trigger(" ".join(text.split()), trigger))
        options.append(option)
    flow = arch in ("sd3", "flux", "chroma", "qwen_image", "flux2", "zimage")
    sampler = s.str("sampler", "flowmatch" if flow else "ddpm").strip()
    sampler_name, scheduler = SAMPLERS.get(sampler.lower(), (sampler, "normal"))
    scheduler = s.str("scheduler", scheduler)
    _check_comfy_names(s, sampler_name, scheduler)
    job = SampleJob(
        prompts=tuple(prompts),
        negative=neg,
        sample_every=s.int("sample_every", 100, lo=1, hi=STEPS_MAX),
        sample_start_step=s.int("sample_start_step", 0, lo=0, hi=STEPS_MAX),
        first_sample=first_sample, seed=seed, walk_seed=walk_seed,
        guidance_scale=s.float("guidance_scale", 7.0, lo=0.0, hi=prompts_module.SCALE_MAX),
        sample_steps=s.int("sample_steps", 20, lo=1, hi=prompts_module.STEPS_MAX), width=_size(s, "width"),
        height=_size(s, "height"), sampler_name=sampler_name, scheduler=scheduler, options=tuple(options))
    s.done()
    return job if job.prompts else None


# sample.samples[] item keys -> (PromptOptions field, kind); guidance_scale is the CFG scale, Flux's guidance
SAMPLE_ITEM_KEYS = {"width": ("width", int), "height": ("height", int), "seed": ("seed", int),
                    "neg": ("negative", str), "guidance_scale": ("cfg", float), "sample_steps": ("steps", int),
                    "steps": ("steps", int)}


def _prompt_options(s: _Section, key: str, prompt: str, item: dict, arch: str):
    """A prompt's text and PromptOptions from its flags (--w 768 ...) and its samples[] item's keys; the flags
    and item keys of ai-toolkit that have no effect here go to the ignored-keys warning."""
    try:
        text, option, skipped = prompts_module.parse_prompt(prompt, prompts_module.AITK_UNSUPPORTED_FLAGS)
    except ConfigError as e:
        raise s.error(f"{key}: {e}") from None
    s.ignored.extend(f"{key}: {flag}" for flag in skipped)
    item_section = _Section({k: v for k, v in item.items() if k != "prompt"}, key, "sample_item", s.ignored,
                            s.source)
    values = {}
    for name, (field_name, kind) in SAMPLE_ITEM_KEYS.items():
        if not item_section.has(name):
            continue
        if kind is int:
            values[field_name] = item_section.int(name, 0, lo=0)
        elif kind is float:
            values[field_name] = item_section.float(name, 0.0, lo=0.0)
        else:
            values[field_name] = item_section.str(name, "", max_length=MAX_PROMPT_LENGTH)
    item_section.done()
    if "steps" in item and "sample_steps" in item and item["steps"] != item["sample_steps"]:
        raise s.error(f"{key}: steps and sample_steps are the same setting; keep one")
    for name in ("width", "height"):
        if name in values:
            values[name] = prompts_module.rounded_size(values[name])
    if arch in ("flux", "flux2"):   # a Flux(.2-dev) job's guidance_scale (and --l) is the embedded guidance, at CFG 1
        scale = values.pop("cfg", option.cfg)
        values["cfg"] = None
        if scale is not None and option.guidance is None:
            values["guidance"] = scale
    if isinstance(values.get("negative"), str):
        values["negative"] = " ".join(values["negative"].split())
    try:
        option = dataclasses.replace(option, **values)
    except ConfigError as e:
        raise s.error(f"{key}: {e}") from None
    return text, option


def _size(s: _Section, name: str) -> int:
    value = s.int(name, 512, lo=64, hi=8192)
    return value - value % 8     # ai-toolkit rounds down to a multiple of 8 as well


def _check_comfy_names(s: _Section, sampler: str, scheduler: str) -> None:
    try:
        import comfy.samplers
    except ImportError:     # validated again when the sampling settings are built
        return
    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        close = difflib.get_close_matches(sampler, comfy.samplers.KSampler.SAMPLERS, n=1)
        raise s.error(f"{s.key('sampler')} {quoted(sampler)} is neither ai-toolkit's ({', '.join(SAMPLERS)}) nor a "
                      f"ComfyUI sampler" + (f"; did you mean {close[0]!r}?" if close else ""))
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise s.error(f"{s.key('scheduler')} {quoted(scheduler)} is not a ComfyUI scheduler; choose one of "
                      f"{', '.join(comfy.samplers.KSampler.SCHEDULERS)}")


def _inject_trigger(prompt: str, trigger: str) -> str:
    return " ".join(prompt.replace("[trigger]", trigger).split()).strip(" ,")


# ---------------------------------------------------------------------------------------------- datasets
def build_dataset(job: Job, folder_root) -> "data.Dataset":
    """All datasets of the job, each at each of its resolutions, as one Dataset (a batch never mixes buckets,
    so resolutions train in batches of their own). `folder_root(folder_path, key)` resolves a folder_path to
    a directory (the node keeps it under ComfyUI's input folder; the command resolves it next to the job)."""
    if not any(not d.validation for d in job.datasets):
        raise ConfigError(f"{job.source}: the job has no datasets to train on: add config.process[0].datasets "
                          f"with a folder_path of training images")
    return _scanned(job, folder_root, validation=False)


def build_validation_dataset(job: Job, folder_root) -> "data.Dataset | None":
    """The job's held-out datasets (validation: true) as one Dataset, or None when it has none."""
    return _scanned(job, folder_root, validation=True) if any(d.validation for d in job.datasets) else None


def _scanned(job: Job, folder_root, validation: bool) -> "data.Dataset":
    from . import data
    items, first = [], None
    for i, d in enumerate(job.datasets):
        if d.validation != validation:
            continue
        root = folder_root(d.folder_path, f"datasets[{i}].folder_path")
        mask_root = folder_root(d.mask_path, f"datasets[{i}].mask_path") if d.mask_path.strip() else None
        control_root = folder_root(d.control_path, f"datasets[{i}].control_path") if d.control_path.strip() else None
        for config in d.configs:
            try:
                scanned = data.scan_dataset(root, config, mask_root=mask_root, control_root=control_root)
            except ConfigError as e:
                raise ConfigError(f"{job.source}: datasets[{i}]: {e}") from None
            first = first or scanned
            items += [dataclasses.replace(item, repeats=item.repeats * d.num_repeats) for item in scanned.items]
    return dataclasses.replace(first, items=tuple(items))
