"""Training images, and the latent and caption caches built from them."""
from __future__ import annotations

import logging

import comfy.model_management
from comfy_api.latest import io
from comfy.utils import ProgressBar

from ..trainers import cache, data
from ..trainers.config import CONTROL_PROMPTS, MASKED_LOSS, DatasetConfig, help_of, quoted
from . import checks, paths
from .types import CATEGORY, Dataset, Latents, Text


def _tip(name: str) -> str:
    return help_of(DatasetConfig, name)


def _progress(bar: ProgressBar):
    """A progress callback that moves the bar and honours Cancel. Cancel is checked on every call: newer
    ComfyUI throttles the bar's updates, so the bar's own hook cannot be relied on to stop the work."""
    def report(done: int, total: int) -> None:
        bar.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return report


class EriTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTrainingImages", display_name="Training images", category=f"{CATEGORY}/data",
            description="A folder of images with .txt captions, sorted into aspect-ratio buckets.",
            inputs=[
                io.String.Input("folder", default="training_images", tooltip=_tip("folder")),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64, tooltip=_tip("resolution")),
                io.String.Input("trigger_word", default="", tooltip=_tip("trigger_word")),
                io.String.Input("default_caption", default="", tooltip=_tip("default_caption")),
                io.Boolean.Input("flip", default=False, tooltip=_tip("flip")),
                io.Int.Input("min_side", default=256, min=64, max=4096, step=64, tooltip=_tip("min_side")),
                io.Int.Input("max_side", default=2048, min=64, max=8192, step=64, tooltip=_tip("max_side")),
                io.Float.Input("max_upscale", default=1.0, min=1.0, max=8.0, step=0.05,
                               tooltip=_tip("max_upscale")),
                # caption variety
                io.Boolean.Input("shuffle_captions", default=False, tooltip=_tip("shuffle_captions"), optional=True),
                io.Int.Input("keep_tokens", default=0, min=0, max=1000, tooltip=_tip("keep_tokens"), optional=True),
                io.Int.Input("caption_variants", default=4, min=1, max=DatasetConfig.MAX_CAPTION_VARIANTS,
                             tooltip=_tip("caption_variants"), optional=True),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip=_tip("caption_dropout"), optional=True),
                # masked loss
                io.Combo.Input("masked_loss", options=list(MASKED_LOSS), default="off", tooltip=_tip("masked_loss"),
                               optional=True),
                io.String.Input("mask_folder", default="", tooltip=_tip("mask_folder"), optional=True),
                io.Float.Input("mask_min_value", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip=_tip("mask_min_value"), optional=True),
                # edit pairs (Flux Kontext, Qwen-Image-Edit)
                io.String.Input("control_folder", default="", tooltip=_tip("control_folder"), optional=True),
                io.Combo.Input("control_prompt", options=list(CONTROL_PROMPTS), default=CONTROL_PROMPTS[0],
                               tooltip=_tip("control_prompt"), optional=True),
                # regularisation images, differential output preservation
                io.Boolean.Input("is_reg", default=False, tooltip=_tip("is_reg"), optional=True),
                io.String.Input("preservation_class", default="", tooltip=_tip("preservation_class"), optional=True),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def validate_inputs(cls, folder=None, max_upscale=None, caption_dropout=None, masked_loss=None, mask_folder=None,
                        mask_min_value=None, trigger_word=None, preservation_class=None, control_folder=None):
        return checks.verdict(
            checks.numbers_problem(cls, max_upscale=max_upscale, caption_dropout=caption_dropout,
                                   mask_min_value=mask_min_value),
            isinstance(trigger_word, str) and isinstance(preservation_class, str) and checks.guarded(
                lambda: DatasetConfig(folder="", trigger_word=trigger_word, preservation_class=preservation_class)),
            folder is not None and checks.guarded(lambda: paths.input_folder_with_images(folder)),
            # (ComfyUI leaves the inputs named here unchecked: the combo's value too)
            masked_loss is not None and masked_loss not in MASKED_LOSS
            and f"masked_loss must be one of {', '.join(MASKED_LOSS)}, got {quoted(masked_loss)}",
            mask_folder is not None and not isinstance(mask_folder, str)
            and f"mask_folder must be a folder name, got {quoted(mask_folder)}",
            masked_loss == "mask_folder" and isinstance(mask_folder, str) and checks.guarded(
                lambda: paths.existing_input_folder(mask_folder, "mask_folder")),
            control_folder is not None and not isinstance(control_folder, str)
            and f"control_folder must be a folder name, got {quoted(control_folder)}",
            isinstance(folder, str) and isinstance(control_folder, str) and control_folder.strip() and checks.guarded(
                lambda: paths.control_folder(folder, control_folder)))

    @classmethod
    def fingerprint_inputs(cls, folder, masked_loss="off", mask_folder="", control_folder="", **kwargs):
        # Re-run when the folder's files (or its masks, or its control images) change although its name did not.
        try:
            fingerprint = data.listing_fingerprint(paths.input_folder(folder))
            if masked_loss == "mask_folder":
                fingerprint += data.listing_fingerprint(paths.input_folder(mask_folder, "mask_folder"))
            if control_folder.strip():
                fingerprint += data.listing_fingerprint(paths.input_folder(control_folder, "control_folder"))
            return fingerprint
        except Exception as e:
            return str(e)

    @classmethod
    def execute(cls, folder, resolution, trigger_word, default_caption, flip, min_side, max_side,
                max_upscale, shuffle_captions=False, keep_tokens=0, caption_variants=4,
                caption_dropout=0.0, masked_loss="off", mask_folder="", mask_min_value=0.0, is_reg=False,
                preservation_class="", control_folder="", control_prompt=CONTROL_PROMPTS[0]) -> io.NodeOutput:
        config = DatasetConfig(folder=folder, resolution=resolution, min_side=min_side, max_side=max_side,
                               max_upscale=max_upscale, default_caption=default_caption,
                               trigger_word=trigger_word, flip=flip, shuffle_captions=shuffle_captions,
                               keep_tokens=keep_tokens, caption_variants=caption_variants,
                               caption_dropout=caption_dropout, masked_loss=masked_loss, mask_folder=mask_folder,
                               mask_min_value=mask_min_value, is_reg=is_reg, preservation_class=preservation_class,
                               control_folder=control_folder, control_prompt=control_prompt)
        root = paths.input_folder(folder)
        mask_root = paths.input_folder(mask_folder, "mask_folder") if masked_loss == "mask_folder" else None
        control_root = paths.input_folder(control_folder, "control_folder") if control_folder.strip() else None
        dataset = data.scan_dataset(root, config, confine=not paths.any_path_allowed(),
                                    on_progress=_progress(ProgressBar(1)),   # the scan reports the total
                                    mask_root=mask_root, control_root=control_root)
        if dataset.skipped:
            logging.warning("EriDiffusion: skipped %d non-image files in %s", len(dataset.skipped), quoted(folder))
        logging.info("EriDiffusion: %r", dataset)
        return io.NodeOutput(dataset)


class EriCombineImages(io.ComfyNode):
    MAX_DATASETS = 4

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriCombineImages", display_name="Combine training images", category=f"{CATEGORY}/data",
            description="Several Training images as one dataset: more folders of training images, or "
                        "regularisation images (is_reg) beside the training images. Each keeps its own "
                        "captions, trigger word, buckets and settings.",
            inputs=[Dataset.Input("dataset_1", tooltip="Training images."),
                    Dataset.Input("dataset_2", tooltip="More training images, or regularisation images (is_reg).")]
            + [Dataset.Input(f"dataset_{n}", optional=True, tooltip="More training or regularisation images.")
               for n in range(3, cls.MAX_DATASETS + 1)],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset_1, dataset_2, **more) -> io.NodeOutput:
        combined = data.combine([dataset_1, dataset_2, *(more[k] for k in sorted(more) if more[k] is not None)])
        logging.info("EriDiffusion: %r", combined)
        return io.NodeOutput(combined)


class EriCacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriCacheLatents", display_name="Cache latents", category=f"{CATEGORY}/data",
            description="Encodes every training image with the VAE once; later runs read the cache on disk.",
            inputs=[
                Dataset.Input("dataset", tooltip="Training images to encode."),
                io.Vae.Input("vae", tooltip="The VAE of the model you train (from the checkpoint loader)."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images encoded at once (same bucket). Lower it if encoding runs out of memory."),
            ],
            outputs=[Latents.Output(display_name="latents")],
        )

    @classmethod
    def execute(cls, dataset, vae, batch_size) -> io.NodeOutput:
        bar = ProgressBar(len(dataset.items))
        latents = cache.cache_latents(dataset, vae, paths.cache_folder("latents"), batch_size,
                                      on_progress=_progress(bar))
        logging.info("EriDiffusion: %r", latents)
        return io.NodeOutput(latents)


class EriCacheCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriCacheCaptions", display_name="Cache captions", category=f"{CATEGORY}/data",
            description="Encodes each distinct caption (its shuffled variants too, with shuffle_captions; and the "
                        "empty caption, for dropout) once, cached on disk. Qwen-Image-Edit's edit pairs "
                        "(control_folder with Qwen-Image's text encoder): each image's captions with its control "
                        "image, as Training images' control_prompt node encodes a prompt with its image.",
            inputs=[
                Dataset.Input("dataset", tooltip="Training images whose captions to encode."),
                io.Clip.Input("clip", tooltip="The text encoder of the model you train."),
            ],
            outputs=[Text.Output(display_name="captions")],
        )

    @classmethod
    def execute(cls, dataset, clip) -> io.NodeOutput:
        bar = ProgressBar(len(dataset.captions) + 1)
        text = cache.cache_captions(dataset, clip, paths.cache_folder("text"), on_progress=_progress(bar))
        logging.info("EriDiffusion: %r", text)
        return io.NodeOutput(text)


NODES = [EriTrainingImages, EriCombineImages, EriCacheLatents, EriCacheCaptions]
