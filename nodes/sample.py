"""Sampling settings for Train steps, and how its samples are saved under ComfyUI's output folder."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from comfy_api.latest import io

import comfy.samplers
import folder_paths

from ..trainers.config import ConfigError, help_of
from ..trainers.prompts import PromptOptions, parse_prompt
from ..trainers.sampling import (SEED_MODES, PromptTexts, Sample, SamplingSettings, encode_prompt,
                                 plain_conditioning)
from . import checks, paths
from .types import CATEGORY, Sampling


def _tip(name: str) -> str:
    return help_of(SamplingSettings, name)


class EriSamplingSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriSamplingSettings", display_name="Sampling settings", category=f"{CATEGORY}/train",
            description="Connect to Train steps to sample images while it trains: every N steps and after its "
                        "last step, one image per prompt, with ComfyUI's samplers on the model as it is then. "
                        "Shown on the Train steps node, saved under output/, returned as its samples output.",
            inputs=[
                io.Vae.Input("vae", tooltip=_tip("vae")),
                io.String.Input("prompts", multiline=True, default="a photo of ohwx",
                                tooltip="One prompt per line, encoded with the CLIP (used only when a CLIP is "
                                        "connected). A line may end with its own settings, as sd-scripts and "
                                        "ai-toolkit write them: --w 768 --h 1024 (size), --d 7 (seed), --s 30 "
                                        "(steps), --l 4.5 (CFG), --g 3.5 (Flux guidance), --n blurry (negative "
                                        "prompt); the others apply where a line sets none."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt for every image, encoded with the CLIP (when no negative "
                                        "CONDITIONING is connected)."),
                io.Int.Input("every_n_steps", default=100, min=1, max=1000000, tooltip=_tip("every_n_steps")),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip=_tip("seed")),
                io.Combo.Input("seed_mode", options=list(SEED_MODES), default="fixed", tooltip=_tip("seed_mode")),
                io.Int.Input("width", default=1024, min=64, max=8192, step=8, tooltip=_tip("width")),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8, tooltip=_tip("height")),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip=_tip("sampler_name")),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip=_tip("scheduler")),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip=_tip("steps")),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_tip("cfg")),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1, tooltip=_tip("guidance")),
                io.String.Input("filename_prefix", default="eri_samples/sample", tooltip=_tip("filename_prefix")),
                io.Clip.Input("clip", optional=True, tooltip="Encodes the prompts (the CLIP of the checkpoint)."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="A prompt already encoded (e.g. by CLIP Text Encode): sampled first, "
                                              "before the prompts."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative CONDITIONING; replaces the negative prompt."),
            ],
            outputs=[Sampling.Output(display_name="sampling")],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, cfg=None, guidance=None):
        return checks.verdict(
            checks.numbers_problem(cls, cfg=cfg, guidance=guidance),
            filename_prefix is not None and checks.guarded(lambda: paths.output_prefix(filename_prefix)))

    @classmethod
    def execute(cls, vae, prompts, negative_prompt, every_n_steps, seed, seed_mode, width, height, sampler_name,
                scheduler, steps, cfg, guidance, filename_prefix, clip=None, positive=None,
                negative=None) -> io.NodeOutput:
        entries = []
        if clip is not None:
            for number, line in enumerate(prompts.splitlines(), 1):
                if line.strip():
                    try:
                        text, options, _ = parse_prompt(line.strip())
                    except ConfigError as e:
                        raise ConfigError(f"prompts, line {number}: {e}") from None
                    entries.append((text, options))
        return io.NodeOutput(make_sampling(
            vae, clip, entries, negative_prompt, positive, negative, every_n_steps=every_n_steps, seed=seed,
            seed_mode=seed_mode, width=width, height=height, sampler_name=sampler_name, scheduler=scheduler,
            steps=steps, cfg=cfg, guidance=guidance, filename_prefix=filename_prefix))


def make_sampling(vae, clip, entries: list[tuple[str, PromptOptions]], negative_prompt: str, positive=None,
                  negative=None, **settings) -> SamplingSettings:
    """SamplingSettings of (prompt, options) entries encoded with `clip` (after a `positive` CONDITIONING, if
    any); a prompt's own negative text is encoded too."""
    paths.output_prefix(settings["filename_prefix"])     # a linked prefix was not known at Queue
    positives = [("conditioning", plain_conditioning(positive))] if positive is not None else []
    options = [PromptOptions()] if positive is not None else []
    texts = [None] * len(positives)          # (PromptTexts: what an adapter's text encoder encodes again)
    negatives = [None] * len(positives)
    for text, option in entries:
        positives.append((text, encode_prompt(clip, text)))
        texts.append(text)
        negatives.append(option.negative if isinstance(option.negative, str) else None)
        if isinstance(option.negative, str):
            option = dataclasses.replace(option, negative=encode_prompt(clip, option.negative))
        options.append(option)
    negative_text = None
    if negative is not None:
        negative = plain_conditioning(negative)
    elif clip is not None:
        negative, negative_text = encode_prompt(clip, negative_prompt), negative_prompt
    elif positives:     # no text encoder: the zeroed prompt, as ConditioningZeroOut makes it
        negative = [[torch.zeros_like(c), {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                                           for k, v in extra.items()}] for c, extra in positives[0][1]]
    if all(o == PromptOptions() for o in options):
        options, negatives = [], []
    prompt_texts = PromptTexts(clip, tuple(texts), tuple(negatives), negative_text) if clip is not None else None
    return SamplingSettings(vae=vae, positives=tuple(positives), negative=negative, options=tuple(options),
                            texts=prompt_texts, **settings)


def save_samples(samples: list[Sample], settings: SamplingSettings) -> list[dict]:
    """Write each sample as <prefix>_step<step>_seed<seed>_p<index>_<counter>_.png under output/; returns
    ComfyUI's image records ({filename, subfolder, type}) for the canvas and /view."""
    output_dir = folder_paths.get_output_directory()
    paths.output_prefix(settings.filename_prefix)    # again at write time: a link may have appeared since Queue
    results = []
    for s in samples:
        used = settings.resolved(s.index, s.step)
        prefix = f"{settings.filename_prefix}_step{s.step:06d}_seed{s.seed}_p{s.index}"
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, output_dir, s.image.shape[1], s.image.shape[0])
        os.makedirs(folder, exist_ok=True)
        meta = PngInfo()
        meta.add_text("eridiffusion", json.dumps({
            "step": s.step, "seed": s.seed, "prompt": s.label, "sampler": settings.sampler_name,
            "scheduler": settings.scheduler, "steps": used["steps"], "cfg": used["cfg"],
            "guidance": used["guidance"]}))
        file = f"{filename}_{counter:05}_.png"
        pixels = np.clip(s.image.numpy() * 255.0, 0, 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, file), pnginfo=meta, compress_level=4)
        results.append({"filename": file, "subfolder": subfolder, "type": "output"})
    return results


NODES = [EriSamplingSettings]


CAPTION_CHARS = 80


def caption_of(sample: Sample, prompts: int) -> str:
    label = " ".join(sample.label.split())
    label = label if len(label) <= CAPTION_CHARS else label[:CAPTION_CHARS - 1] + "…"
    return f"step {sample.step} · prompt {sample.index + 1}/{prompts}: {label}"


def captioned_previews(samples: list[Sample]) -> list[dict]:
    """What the Train steps node shows of a round: each sample with a strip below it saying its step and
    prompt, written to ComfyUI's temp folder as PreviewImage does (the files under output/ stay as sampled)."""
    from PIL import ImageDraw, ImageFont
    temp_dir = folder_paths.get_temp_directory()
    results = []
    for s in samples:
        pixels = np.clip(s.image.numpy() * 255.0, 0, 255).round().astype(np.uint8)
        height, width = pixels.shape[:2]
        font = ImageFont.load_default(size=max(10, width // 40))
        strip = max(14, width // 40 * 3 // 2)
        canvas = Image.new("RGB", (width, height + strip), (27, 29, 34))
        canvas.paste(Image.fromarray(pixels), (0, 0))
        draw, caption = ImageDraw.Draw(canvas), caption_of(s, len(samples))
        while len(caption) > 8 and draw.textlength(caption, font=font) > width - 8:
            caption = caption[:-2] + "…"
        draw.text((4, height + strip // 2), caption, fill=(220, 225, 230), font=font, anchor="lm")
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            f"eri_preview_step{s.step:06d}_p{s.index}", temp_dir, width, height)
        os.makedirs(folder, exist_ok=True)
        file = f"{filename}_{counter:05}_.png"
        canvas.save(os.path.join(folder, file), compress_level=1)
        results.append({"filename": file, "subfolder": subfolder, "type": "temp"})
    return results
