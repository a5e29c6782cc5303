"""Load training job (YAML): an ai-toolkit-style job file as the dataset, adapter, settings and sampling
objects of the other nodes, so a YAML job runs, and can be inspected and changed, on the canvas."""
from __future__ import annotations

import hashlib
import logging
import os

import torch
from comfy_api.latest import io

import folder_paths

from ..trainers import checkpoint, data
from ..trainers.arch import detect
from ..trainers.arch.sdxl import predicts_v
from ..trainers.config import ConfigError, quoted
from ..trainers.job import MAX_JOB_BYTES, Job, build_dataset, parse_job, read_job_file
from ..trainers.prompts import PromptOptions
from ..trainers.sampling import SamplingSettings
from ..trainers.state import new_adapter
from . import paths
from .sample import make_sampling
from .types import CATEGORY, Adapter, Dataset, Sampling, Settings

DEFAULT_JOB = """\
job: extension
config:
  name: my_lora
  process:
    - type: sd_trainer
      trigger_word: ohwx
      network: {type: lora, linear: 16, linear_alpha: 16}
      datasets:
        - folder_path: training_images     # under ComfyUI's input folder
          caption_ext: txt
          resolution: [1024]
      train: {batch_size: 1, steps: 1000, lr: 1e-4, optimizer: adamw, dtype: bf16}
      save: {dtype: float16, save_every: 250, max_step_saves_to_keep: 4}
      sample:
        sample_every: 250
        prompts: ["a photo of [trigger]"]
        seed: 42
        guidance_scale: 4
        sample_steps: 20
        width: 1024
        height: 1024
"""


MAX_FILE_NAME = 1024        # a job file's name in the input folder; a longer "name" is not one


def read_job(job: str) -> Job:
    """The node's `job` input: a .yaml/.yml file under ComfyUI's input folder, or the YAML text itself."""
    text = job.strip()
    if "\n" not in text and text.lower().endswith((".yaml", ".yml")):
        if len(text) > MAX_FILE_NAME:
            raise ConfigError(f"job file name {quoted(text)} is {len(text):,} characters long; a file name is at "
                              f"most {MAX_FILE_NAME:,}")
        path = paths.contained(folder_paths.get_input_directory(), text, "job")
        if not os.path.isfile(path):
            raise ConfigError(f"job file {quoted(text)} does not exist in ComfyUI's input folder (looked for "
                              f"{quoted(path)})")
        return parse_job(read_job_file(path, text), path)
    return parse_job(job, "job")


def queue_problem(job: str) -> str | None:
    """What is wrong with the `job` input as far as Queue can tell without a model: the job itself (read as
    execute reads it), and its dataset folders, which must be folders inside ComfyUI's input folder. None
    when it is fine. Quick: it reads the job and looks at folders, and opens no image."""
    try:
        parsed = read_job(job)
        for i, dataset in enumerate(parsed.datasets):
            key = f"datasets[{i}].folder_path"
            folder = input_folder_root(dataset.folder_path, key)
            if not os.path.isdir(folder):
                return (f"{parsed.source}: {key} {quoted(dataset.folder_path)} does not exist in ComfyUI's input "
                        f"folder (looked for {quoted(folder)}): create it and put the training images in it")
            if dataset.control_path.strip():
                paths.control_folder(dataset.folder_path, dataset.control_path, f"datasets[{i}].control_path")
    except ValueError as e:     # ConfigError, PathError
        return str(e)
    return None


def input_folder_root(folder_path: str, key: str) -> str:
    return paths.input_folder(folder_path, key)


def make_adapter(job: Job, model, clip=None):
    if job.network.text_encoder != "none" and clip is None:
        raise ConfigError(f"{job.source}: train.train_text_encoder is true: connect the CLIP to Load training job's "
                          f"clip input (and to Train steps'), or set train_text_encoder to false")
    try:
        spec = checkpoint.make_spec(model, **job.network.make_spec_kwargs(), clip=clip)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{job.source}: network: {e}") from None
    with torch.inference_mode(False):
        return new_adapter(spec, model, clip)


def check_arch(job: Job, model) -> str:
    arch = detect(model).name
    if job.model.arch and job.model.arch != arch:
        raise ConfigError(f"{job.source}: model.arch says {job.model.arch} but the MODEL is {arch}: connect a "
                          f"{job.model.arch} MODEL or change model.arch")
    if job.model.v_pred and arch != "sdxl":
        raise ConfigError(f"{job.source}: model.is_v_pred is true but the MODEL is {arch}, a flow-matching model: "
                          f"remove is_v_pred (it applies to SDXL)")
    return arch


def sampling_settings(job: Job, arch: str, clip, vae, filename_prefix: str) -> SamplingSettings | None:
    """Sampling settings of the job's `sample` section (None without prompts), each prompt with its own
    options (samples[] items, --w/--h/--d/... flags). Flux takes guidance_scale as its embedded guidance with
    CFG 1 (as ai-toolkit samples it); SDXL and SD3 take it as the CFG scale."""
    s = job.sample
    if s is None:
        return None
    flux = arch in ("flux", "flux2")
    return make_sampling(
        vae, clip, list(zip(s.prompts, s.options or [PromptOptions()] * len(s.prompts))), s.negative,
        every_n_steps=s.sample_every, seed=s.seed, seed_mode="fixed", width=s.width, height=s.height,
        sampler_name=s.sampler_name, scheduler=s.scheduler, steps=s.sample_steps,
        cfg=1.0 if flux else s.guidance_scale, guidance=s.guidance_scale if flux else 3.5,
        filename_prefix=filename_prefix)


class EriLoadTrainingJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriLoadTrainingJob", display_name="Load training job (YAML)", category=f"{CATEGORY}/job",
            description="Reads a training job in ai-toolkit's YAML dialect (config.process[0]: network, train, "
                        "datasets, save, sample) into the objects of Training images, Create adapter, Training "
                        "settings and Sampling settings. Connect them to Cache latents / Cache captions / Train "
                        "steps, and the steps and prefix to Train steps / Save adapter. Paths stay inside "
                        "ComfyUI's input folder; model.name_or_path is not read (the MODEL input is trained), and "
                        "model.is_v_pred needs a MODEL that predicts v (ComfyUI's ModelSamplingDiscrete node, "
                        "sampling v_prediction, after the loader).",
            inputs=[
                io.Model.Input("model", tooltip="The model to train (the job's model.arch, if given, must match)."),
                io.String.Input("job", multiline=True, default=DEFAULT_JOB,
                                tooltip="The job: YAML pasted here, or the name of a .yaml file in ComfyUI's "
                                        "input folder (e.g. jobs/my_lora.yaml). datasets[].folder_path is a "
                                        "folder in ComfyUI's input folder."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Encodes the sample prompts; with a VAE, gives the sampling output. Needed "
                                      "when the job has train.train_text_encoder: true (its CLIP-L / CLIP-G get "
                                      "adapters; connect the same CLIP to Train steps)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the samples; with a CLIP, gives the sampling "
                                                           "output."),
            ],
            outputs=[
                Dataset.Output(display_name="dataset", tooltip="All datasets at all their resolutions."),
                Adapter.Output(display_name="adapter", tooltip="A new adapter as the job's network section says."),
                Settings.Output(display_name="settings", tooltip="The job's train section."),
                io.Int.Output(display_name="steps", tooltip="train.steps: connect to Train steps' steps."),
                io.String.Output(display_name="save_prefix",
                                 tooltip="<name>/<name>: connect to Save adapter's filename_prefix."),
                Sampling.Output(display_name="sampling",
                                tooltip="The job's sample section (nothing without CLIP and VAE, or without "
                                        "prompts): connect to Train steps."),
            ],
        )

    @classmethod
    def validate_inputs(cls, job=None):
        # At Queue (POST /prompt): a hostile or mistyped job is refused before a model loads; ComfyUI shows
        # the message under the node. A linked job arrives as None and is read when the node executes.
        if job is None:
            return True
        return queue_problem(job) or True

    @classmethod
    def fingerprint_inputs(cls, model=None, job="", **kwargs):
        # Re-run when the job file or the image folders change although the inputs did not.
        digest = hashlib.sha256(job.encode())
        try:
            parsed = read_job(job)
            if parsed.source != "job":
                with open(parsed.source, "rb") as f:
                    digest.update(f.read(MAX_JOB_BYTES + 1))
            for d in parsed.datasets:
                digest.update(data.listing_fingerprint(input_folder_root(d.folder_path, "folder_path")).encode())
                if d.mask_path.strip():
                    digest.update(data.listing_fingerprint(input_folder_root(d.mask_path, "mask_path")).encode())
                if d.control_path.strip():
                    digest.update(data.listing_fingerprint(input_folder_root(d.control_path, "control_path")).encode())
        except Exception as e:
            digest.update(str(e).encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, model, job, clip=None, vae=None) -> io.NodeOutput:
        parsed = read_job(job)
        arch = check_arch(parsed, model)
        parsed = parsed.for_arch(arch)
        if parsed.ignored_warning():
            logging.warning("EriDiffusion: %s", parsed.ignored_warning())
        if parsed.model.v_pred and not predicts_v(model):
            raise ConfigError(f"{parsed.source}: model.is_v_pred is true but the MODEL predicts noise (eps): put "
                              f"ComfyUI's ModelSamplingDiscrete node (sampling v_prediction) after the model loader "
                              f"and train that MODEL, or remove is_v_pred")
        dataset = build_dataset(parsed, input_folder_root)
        if any(d.validation for d in parsed.datasets):
            logging.warning("EriDiffusion: %s: the validation datasets are evaluated by the headless run; on the "
                            "canvas, connect their own Training images, Cache latents and Cache captions to Train "
                            "steps' validation inputs", parsed.source)
        sampling = None
        if clip is not None and vae is not None:
            sampling = sampling_settings(parsed, arch, clip, vae, f"{parsed.save_prefix}_sample")
        return io.NodeOutput(dataset, make_adapter(parsed, model, clip), parsed.settings, parsed.steps,
                             parsed.save_prefix, sampling)


NODES = [EriLoadTrainingJob]
