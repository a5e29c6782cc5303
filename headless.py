"""Running a YAML job without a server: ComfyUI as a library loads the model files, the engine trains.

`python -m <pack folder> train job.yaml` (see __main__.py) comes here once ComfyUI is importable. Layout of a
job's folder, <training_folder>/<name>/ (relative paths in the job are relative to the job file's folder):

    <name>_<step>.safetensors (+ .eri-state)   adapters, every save.save_every steps and at the end; the last
                                               save.max_step_saves_to_keep are kept. Loadable by ComfyUI's
                                               LoRA loaders; the newest is resumed from on the next run
    samples/<name>_step<step>_seed<seed>_p<prompt>_<n>_.png
    job.yaml                                   the job as it was run
"""
from __future__ import annotations

import logging
import math
import os
import shutil

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from .nodes import job as job_node
from .nodes.sample import save_samples
from .trainers import cache, checkpoint, loop
from .trainers.config import ConfigError, quoted
from .trainers.arch.sdxl import v_prediction_model
from .trainers.distributed import World
from .trainers.files import state_path_for
from .trainers.job import Job, ModelJob, build_dataset, build_validation_dataset
from .trainers.sampling import sample_round
from .trainers.state import AdapterState

# (Z-Image's Qwen3-4B loads as ComfyUI's CLIPLoader loads it with type lumina2)
CLIP_TYPES = {"sdxl": "STABLE_DIFFUSION", "sd3": "SD3", "flux": "FLUX", "chroma": "CHROMA", "qwen_image": "QWEN_IMAGE",
              "flux2": "FLUX2", "zimage": "LUMINA2"}


def base_dir(job: Job) -> str:
    return os.path.dirname(job.source) if os.path.isfile(job.source) else os.getcwd()


def _path(job: Job, value: str) -> str:
    return os.path.abspath(os.path.join(base_dir(job), os.path.expanduser(value)))


# --------------------------------------------------------------------------------------------- models
def load_models(job: Job):
    """(MODEL, CLIP, VAE) from the files model: names, with ComfyUI's own loaders."""
    m: ModelJob = job.model
    if not m.name_or_path:
        raise ConfigError(f"{job.source}: model.name_or_path is required: the checkpoint or diffusion-model file")
    path = _path(job, m.name_or_path)
    if not os.path.isfile(path):
        raise ConfigError(f"{job.source}: model.name_or_path {quoted(m.name_or_path)} is not a file (looked for {path}). "
                          f"EriDiffusion loads local files: download the model (e.g. the .safetensors of "
                          f"{m.name_or_path}) and name the file")
    options = {"dtype": torch.float8_e4m3fn} if m.quantize else {}
    clip = vae = None
    if _is_checkpoint(path):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=not m.vae_path, output_clip=not m.text_encoder_paths, model_options=options)
    else:
        model = comfy.sd.load_diffusion_model(path, model_options=options)
    arch = job_node.check_arch(job, model)
    if m.v_pred:    # as ComfyUI's ModelSamplingDiscrete node (v_prediction) would patch it on the canvas
        model = v_prediction_model(model)
    if m.text_encoder_paths:
        files = [_path(job, p) for p in m.text_encoder_paths]
        for name, file in zip(m.text_encoder_paths, files):
            if not os.path.isfile(file):
                raise ConfigError(f"{job.source}: model.text_encoder_paths: {quoted(name)} is not a file (looked for {file})")
        # (0.3.75 has no CLIPType FLUX2: it finds Flux.2's Mistral encoder by its weights, as its CLIPLoader does)
        clip_type = getattr(comfy.sd.CLIPType, CLIP_TYPES[arch], comfy.sd.CLIPType.STABLE_DIFFUSION)
        clip = comfy.sd.load_clip(files, clip_type=clip_type)
    if m.vae_path:
        file = _path(job, m.vae_path)
        if not os.path.isfile(file):
            raise ConfigError(f"{job.source}: model.vae_path {quoted(m.vae_path)} is not a file (looked for {file})")
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(file))
    if clip is None:
        raise ConfigError(f"{job.source}: {quoted(m.name_or_path)} has no text encoder: list its files in "
                          f"model.text_encoder_paths (Flux: clip_l and t5xxl; SD 3.5: clip_l, clip_g, t5xxl; "
                          f"Chroma: t5xxl; Qwen-Image: qwen_2.5_vl_7b; Z-Image: qwen_3_4b)")
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise ConfigError(f"{job.source}: {quoted(m.name_or_path)} has no VAE: name its file in model.vae_path")
    return model, clip, vae


def _is_checkpoint(path: str) -> bool:
    """A full checkpoint (diffusion model under model.diffusion_model. plus VAE / text encoders), as opposed
    to a diffusion model alone (Flux and SD 3.5 are often distributed so)."""
    if not path.endswith(".safetensors"):
        return True
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return any(k.startswith("model.diffusion_model.") for k in f.keys())


# --------------------------------------------------------------------------------------------- adapters
def _series(folder: str, name: str):
    """Path of the job's adapter at a step (the saves of one job form a series)."""
    return lambda step: os.path.join(folder, f"{name}_{step:06d}.safetensors")


def saved_adapters(folder: str, name: str) -> list[tuple[int, str]]:
    """(step, path) of the adapters saved in `folder` for job `name` that can be resumed, oldest first."""
    return sorted((step, path) for step, path in checkpoint.saved_steps(_series(folder, name)).items()
                  if os.path.isfile(state_path_for(path)))


def save(state: AdapterState, job: Job, folder: str) -> str:
    series = _series(folder, job.name)
    checkpoint.save_adapter(state, series(state.step), job.save.dtype)
    checkpoint.prune_saves(series, job.save.max_step_saves_to_keep)
    return series(state.step)


def starting_adapter(job: Job, model, folder: str, clip=None) -> AdapterState:
    """The newest adapter saved in the job's folder (resumed exactly), or a new one."""
    fresh = job_node.make_adapter(job, model, clip)
    saved = saved_adapters(folder, job.name)
    if not saved:
        return fresh
    step, path = saved[-1]
    state = checkpoint.load_adapter(path, model)
    if state.spec != fresh.spec:
        differ = [k for k in ("kind", "rank", "alpha", "preset", "dora", "lokr_factor", "conv", "conv_rank",
                              "conv_alpha", "dtype", "targets") if getattr(state.spec, k) != getattr(fresh.spec, k)]
        raise ConfigError(f"{job.source}: the newest saved adapter {os.path.basename(path)} differs from the job's "
                          f"network ({', '.join(differ)}): change the job back, or move the folder's adapters "
                          f"away to start over")
    logging.info("EriDiffusion: resuming %s at step %d", path, step)
    return state


# --------------------------------------------------------------------------------------------- the run
def run_job(job: Job, world: World | None = None, progress: bool = True) -> AdapterState:
    """Train the job to train.steps, resuming from the newest adapter in its folder. Rank 0 (or the only
    process) writes adapters, samples and job.yaml; every rank trains its share of each batch."""
    main = world is None or world.is_main
    folder = _path(job, os.path.join(job.training_folder, job.name))
    model, clip, vae = load_models(job)
    arch = job_node.check_arch(job, model)
    job = job.for_arch(arch)
    if main and job.ignored_warning():
        logging.warning("EriDiffusion: %s", job.ignored_warning())
    folder_root = lambda folder_path, key: _dataset_root(job, folder_path, key)   # noqa: E731
    dataset = build_dataset(job, folder_root)
    held_out = build_validation_dataset(job, folder_root)
    cache_dir = os.environ.get("ERI_CACHE_DIR") or os.path.join(_path(job, job.training_folder), ".eri-cache")
    latents = text = validation = None
    for turn in ("main", "others"):      # rank 0 encodes; the other ranks then read its cache files
        if (turn == "main") == main:
            latents = cache.cache_latents(dataset, vae, os.path.join(cache_dir, "latents"))
            text = cache.cache_captions(dataset, clip, os.path.join(cache_dir, "text"))
            if held_out is not None:
                validation = loop.Validation(cache.cache_latents(held_out, vae, os.path.join(cache_dir, "latents")),
                                             cache.cache_captions(held_out, clip, os.path.join(cache_dir, "text")),
                                             job.validation_every)
        if world is not None:
            world.barrier()
    state = starting_adapter(job, model, folder, clip)
    remaining = job.steps - state.step
    if remaining <= 0:
        if main:
            print(f"{job.name}: already trained to step {state.step} of {job.steps} ({folder})", flush=True)
        return state

    if main:    # the job's folder is made once training is about to start: a job that fails before leaves none
        os.makedirs(folder, exist_ok=True)
        if os.path.isfile(job.source):
            shutil.copyfile(job.source, os.path.join(folder, "job.yaml"))
    sampling = job_node.sampling_settings(job, arch, clip, vae, f"samples/{job.name}") if main else None
    output_dir = folder_paths.get_output_directory()
    folder_paths.set_output_directory(folder)    # where save_samples writes (this process only)
    bar = _ProgressBar(state.step, job.steps) if main and progress else None
    try:
        if sampling and job.sample.first_sample and state.step == 0 and job.sample.sample_start_step == 0:
            save_samples(sample_round(model, state, sampling), sampling)

        def on_every(run: loop.TrainingRun):
            step, last = run.step_count, run.step_count == run.end_step
            if not main:
                return
            current = run.export()
            if step % job.save.save_every == 0 or last:
                path = save(current, job, folder)
                bar.write(f"saved {path}") if bar else logging.info("EriDiffusion: saved %s", path)
            if sampling and (step % sampling.every_n_steps == 0 or last) and step >= job.sample.sample_start_step:
                save_samples(sample_round(model, current, sampling), sampling)

        def on_stopped(last_good: AdapterState):     # Ctrl-C, NaN, out of memory: keep what was trained
            if main:
                logging.warning("EriDiffusion: stopped; saved the last finished step: %s", save(last_good, job, folder))

        every = math.gcd(job.save.save_every, sampling.every_n_steps) if sampling else job.save.save_every
        def log_validation(report: loop.StepReport):   # without the progress bar
            if main and report.val_loss is not None:
                print(f"step {report.step}: validation loss {report.val_loss:.5f}", flush=True)

        trained = loop.train(model, state, latents, text, job.settings, remaining,
                             on_step=bar.update if bar else log_validation,
                             on_every=on_every, every=every, world=world, on_stopped=on_stopped,
                             validation=validation, clip=clip)
    finally:
        folder_paths.set_output_directory(output_dir)
        if bar:
            bar.close()
    if main:
        print(f"{job.name}: trained to step {trained.step}; adapters in {folder}", flush=True)
    return trained


def _dataset_root(job: Job, folder_path: str, key: str) -> str:
    root = _path(job, folder_path)
    if not os.path.isdir(root):
        raise ConfigError(f"{job.source}: {key} {quoted(folder_path)} is not a folder (looked for {root})")
    return root


class _ProgressBar:
    """tqdm over the steps of this run: step / total, loss, learning rate, it/s and ETA."""

    def __init__(self, done: int, total: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)
        self.val_loss = None

    def update(self, report: loop.StepReport) -> None:
        if report.val_loss is not None:    # a line of its own, kept above the bar; the last one stays beside it
            self.val_loss = f"{report.val_loss:.5f}"
            self.bar.write(f"step {report.step}: validation loss {self.val_loss}")
        shown = dict(loss=f"{report.loss:.5f}", lr=f"{report.learning_rate:.3g}")
        if self.val_loss is not None:
            shown["val_loss"] = self.val_loss
        self.bar.set_postfix(**shown, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
