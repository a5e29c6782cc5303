"""On-disk caches of VAE latents and text-encoder outputs, keyed by content hashes and safe to delete."""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, quoted
from .data import Dataset, DatasetItem, load_control, load_image, load_mask
from .files import atomic_write


def model_fingerprint(module: torch.nn.Module, patches: dict | None = None, extra: str = "") -> str:
    """Identifies a model without hashing every byte: its class (the same CLIP-L/G weights give SDXL's and
    SD3's text encoders different outputs), names, shapes, dtypes and two sums per tensor, and `extra`."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|{extra}".encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            t = tensor.detach()
            sums = (t.float().sum().item(), t.float().abs().sum().item()) if t.numel() else (0.0, 0.0)
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}{sums[0]:.6e}{sums[1]:.6e}".encode())
    for key in sorted(patches or {}):
        digest.update(f"patch:{key}:{len(patches[key])}".encode())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------- latents
@dataclass(frozen=True)
class LatentSet:
    """VAE latents of every dataset item (raw VAE output; the architecture's latent format scales them)."""
    dataset: Dataset
    latents: tuple[torch.Tensor, ...]   # (C, h, w) each, float32, CPU; a video VAE's (C, 1, h, w)
    vae_id: str
    encoded: int                        # VAE encodes this run performed (0 when everything came from disk)
    # masked loss: one (h, w) weight map per latent (ones for an item without a mask) when any item has a mask,
    # else empty
    masks: tuple[torch.Tensor, ...] = ()
    # edit pairs (Flux Kontext): each item's control image's latent (raw VAE output, the latent's shape) when the
    # items have control images, else empty
    controls: tuple[torch.Tensor, ...] = ()

    def __repr__(self):
        masks = f", {len(self.masks)} masks" if self.masks else ""
        controls = f", {len(self.controls)} control latents" if self.controls else ""
        return f"LatentSet({len(self.latents)} latents, {self.encoded} encoded{masks}{controls}, vae {self.vae_id})"


def latent_key(item: DatasetItem, vae_id: str) -> str:
    text = f"{item.content_hash}|{item.bucket}|{item.crop}|{item.flip}|{vae_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def control_key(item: DatasetItem, vae_id: str) -> str:
    """A control image's latent: keyed by its bytes, and by its training image's size, bucket, crop and flip
    (it is fitted as that image is)."""
    text = f"control|{item.control_hash}|{item.original_size}|{item.bucket}|{item.crop}|{item.flip}|{vae_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_latents(dataset: Dataset, vae, cache_dir: str, batch_size: int = 4,
                  on_progress: Callable[[int, int], None] | None = None) -> LatentSet:
    """Encode every item (and its control image, for edit pairs) with the ComfyUI VAE (batched per bucket),
    reading and writing `cache_dir`. on_progress(done, total) is called as latents are read from the cache, as
    each image is read and after each batch: a caller may raise from it (Cancel), and at most the batch being
    encoded is finished."""
    os.makedirs(cache_dir, exist_ok=True)
    vae_id = model_fingerprint(vae.first_stage_model, getattr(vae.patcher, "patches", None))
    paired = any(item.control for item in dataset.items)
    if paired and not all(item.control for item in dataset.items):
        raise ConfigError("some of these training images have control images and some do not (Combine training "
                          "images of a folder with control_folder and one without): give every folder a "
                          "control_folder, or none")
    jobs = [(latent_key(item, vae_id), item, _pixels) for item in dataset.items]
    if paired:
        jobs += [(control_key(item, vae_id), item, _control_pixels) for item in dataset.items]
    latents, encoded = _encoded(jobs, vae, cache_dir, batch_size, on_progress)
    count = len(dataset.items)
    ordered = tuple(latents[:count])
    return LatentSet(dataset, ordered, vae_id, encoded, cache_masks(dataset, ordered, cache_dir),
                     controls=tuple(latents[count:]))


def _encoded(jobs: list, vae, cache_dir: str, batch_size: int,
             on_progress: Callable[[int, int], None] | None) -> tuple[list[torch.Tensor], int]:
    """The latent of each (cache key, item, pixel loader) job, from `cache_dir` or encoded (batched per bucket
    and loader), and how many were encoded."""
    def report(done: int) -> None:
        if on_progress:
            on_progress(done, len(jobs))

    latents: dict[int, torch.Tensor] = {}
    missing = []
    for index, (key, _, _) in enumerate(jobs):
        path = os.path.join(cache_dir, key + ".safetensors")
        if os.path.isfile(path):
            try:
                latents[index] = load_file(path)["latent"]
                if len(latents) % 64 == 0:   # thousands of cached files take seconds to read
                    report(len(latents))
                continue
            except Exception:   # a damaged cache file is simply re-encoded
                pass
        missing.append(index)
    by_bucket: dict = {}
    for index in missing:
        _, item, loader = jobs[index]
        by_bucket.setdefault((item.bucket, loader), []).append(index)
    done = len(latents)
    report(done)
    for group in by_bucket.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            images = []
            for i in chunk:   # a large image takes a good part of a second to decode and resize
                _, item, loader = jobs[i]
                images.append(loader(item))
                report(done)
            pixels = torch.stack(images)
            if getattr(vae, "latent_dim", 2) == 3:
                # a video VAE (Qwen-Image's Wan 2.1) reads a batch of images as the frames of one video: each
                # image alone, as VAEEncode encodes one, (1, C, 1, h, w)
                encoded = torch.cat([vae.encode(pixels[j:j + 1]) for j in range(len(chunk))]).detach().float().cpu()
            else:
                encoded = vae.encode(pixels).detach().float().cpu()
            for i, latent in zip(chunk, encoded):
                latent = latent.clone().contiguous()
                latents[i] = latent
                atomic_write(os.path.join(cache_dir, jobs[i][0] + ".safetensors"),
                             lambda p, t=latent: save_file({"latent": t}, p))
            done += len(chunk)
            report(done)
    return [latents[i] for i in range(len(jobs))], len(missing)


def mask_key(item: DatasetItem, size: tuple[int, int]) -> str:
    """Keyed by the mask's content (the image's own bytes for alpha), the crop and the latent's size."""
    source = "alpha" if item.mask == "alpha" else "file"
    text = f"mask|{source}|{item.mask_hash}|{item.original_size}|{item.bucket}|{item.crop}|{item.flip}|" \
           f"{item.mask_min!r}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_masks(dataset: Dataset, latents: tuple[torch.Tensor, ...], cache_dir: str) -> tuple[torch.Tensor, ...]:
    """The masked-loss weights of every item at its latent's size, read from or written to `cache_dir` (beside
    the latents); () when no item has a mask."""
    if not any(item.mask for item in dataset.items):
        return ()
    masks = []
    for item, latent in zip(dataset.items, latents):
        size = tuple(latent.shape[-2:])
        mask = None
        if item.mask:
            path = os.path.join(cache_dir, mask_key(item, size) + ".safetensors")
            if os.path.isfile(path):
                try:
                    mask = load_file(path)["mask"]
                except Exception:   # a damaged cache file is simply made again
                    mask = None
            if mask is None or tuple(mask.shape) != size:
                mask = load_mask(item, size)
                if mask is not None:
                    atomic_write(path, lambda p, t=mask: save_file({"mask": t}, p))
        masks.append(torch.ones(size) if mask is None else mask)
    return tuple(masks)


def _pixels(item: DatasetItem) -> torch.Tensor:
    # ComfyUI IMAGE layout: (H, W, 3) float in [0, 1].
    return torch.from_numpy(np.asarray(load_image(item), dtype=np.float32) / 255.0)


def _control_pixels(item: DatasetItem) -> torch.Tensor:
    return torch.from_numpy(np.asarray(load_control(item), dtype=np.float32) / 255.0)


# ------------------------------------------------------------------------------------------------------- text
@dataclass(frozen=True)
class TextEmbedding:
    context: torch.Tensor     # (tokens, dim)
    pooled: torch.Tensor      # (dim,), or (0,) where the text encoder has none (Chroma)


@dataclass(frozen=True)
class TextSet:
    """Text-encoder outputs for every distinct caption of a dataset, plus the empty caption (for dropout)."""
    embeddings: tuple[tuple[str, TextEmbedding], ...]
    clip_id: str
    encoded: int
    # edit pairs whose text encoder sees the control image (Qwen-Image-Edit): each item's captions encoded with
    # its control image, named by `image_caption(caption, item)`
    with_images: bool = False

    def __repr__(self):
        images = ", with their control images" if self.with_images else ""
        return f"TextSet({len(self.embeddings)} captions{images}, {self.encoded} encoded, clip {self.clip_id})"

    @functools.cached_property
    def _by_caption(self) -> dict[str, TextEmbedding]:
        return dict(self.embeddings)

    def __contains__(self, caption: str) -> bool:
        return caption in self._by_caption

    def get(self, caption: str, item: DatasetItem | None = None) -> TextEmbedding:
        """The caption's embedding (with `item`'s control image where the captions were encoded with them)."""
        # a lookup per image and step among up to MAX_CAPTION_VARIANTS captions per image
        name = image_caption(caption, item) if self.with_images and item is not None else caption
        if name in self._by_caption:
            return self._by_caption[name]
        raise KeyError(f"caption {quoted(caption)} was not cached: connect the same dataset to Cache captions")


def image_caption(caption: str, item: DatasetItem) -> str:
    """A caption encoded with its item's control image, as TextSet names it: the control image's identity (its
    bytes and how it is fitted to its training image's bucket: a hex digest, fixed length) then the caption."""
    return control_key(item, f"caption {item.control_prompt}") + caption


def text_key(caption: str, clip_id: str) -> str:
    return hashlib.sha256(f"{clip_id}|{caption}".encode()).hexdigest()


def cache_captions(dataset: Dataset, clip, cache_dir: str,
                   on_progress: Callable[[int, int], None] | None = None) -> TextSet:
    """Every caption training may draw from `dataset`, encoded (cache_text). Edit pairs for a text encoder that
    sees images (Qwen-Image-Edit's Qwen2.5-VL): each item's captions with its control image."""
    from .arch import qwen_image
    paired = qwen_image.sees_images(clip) and any(item.control for item in dataset.items)
    return cache_text(dataset.captions, clip, cache_dir, on_progress, image_items=dataset.items if paired else ())


def cache_text(captions, clip, cache_dir: str,
               on_progress: Callable[[int, int], None] | None = None,
               image_items: tuple[DatasetItem, ...] = ()) -> TextSet:
    """Encode each distinct caption and the empty one, reading and writing `cache_dir`. on_progress(done,
    total) is called before the first caption and after each: a caller may raise from it (Cancel) and at
    most one more caption is encoded. `image_items`: edit pairs for a text encoder that sees images
    (Qwen-Image-Edit's): each item's own captions (and the empty one) are encoded with its control image instead,
    as TextEncodeQwenImageEdit encodes a prompt with its image (`captions` is then not used)."""
    from .arch import qwen_image
    os.makedirs(cache_dir, exist_ok=True)
    # layer_idx: CLIPSetLastLayer ("clip skip") changes the output, not the weights
    clip_id = model_fingerprint(clip.cond_stage_model, getattr(clip.patcher, "patches", None),
                                extra=f"{type(clip.tokenizer).__qualname__}|layer {getattr(clip, 'layer_idx', None)}")
    if image_items:
        wanted = [(image_caption(c, item), c, item) for item in image_items for c in sorted(_captions_of(item))]
        wanted = list({name: (name, c, item) for name, c, item in wanted}.values())
    else:
        wanted = [(c, c, None) for c in [""] + sorted(set(captions) - {""})]
    out, encoded = [], 0
    if on_progress:
        on_progress(0, len(wanted))
    for n, (name, caption, item) in enumerate(wanted, 1):
        path = os.path.join(cache_dir, text_key(name if item is None else "image " + name, clip_id) + ".safetensors")
        tensors = None
        if os.path.isfile(path):
            try:
                tensors = load_file(path)
            except Exception:
                tensors = None
        if tensors is None:
            if item is None:
                context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            else:
                context, pooled = qwen_image.edit_caption(clip, caption, _control_pixels(item)[None],
                                                          item.control_prompt)
            # a T5-only encoder (Chroma's) has no pooled output: an empty one
            pooled = torch.zeros(0) if pooled is None else pooled[0].detach().float().cpu().contiguous()
            tensors = {"context": context[0].detach().float().cpu().contiguous(), "pooled": pooled}
            atomic_write(path, lambda p, t=tensors: save_file(t, p))
            encoded += 1
        out.append((name, TextEmbedding(tensors["context"].clone(), tensors["pooled"].clone())))
        if on_progress:
            on_progress(n, len(wanted))
    return TextSet(tuple(out), clip_id, encoded, with_images=bool(image_items))


def _captions_of(item: DatasetItem) -> set[str]:
    """Every caption training may draw for one item (as Dataset.captions for all): its own or its shuffled
    variants, the empty one, and differential output preservation's."""
    own = set(item.caption_variants or (item.caption,)) | {""}
    return own | {item.preserved(c) for c in own}
