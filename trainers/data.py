"""Training images: folder scan, captions, kohya repeat folders and multi-resolution aspect buckets."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import re
import stat
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from . import files
from .config import ConfigError, DatasetConfig, quoted

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What PIL may decode a training image as (whatever its extension says). Without this list PIL tries every
# format it knows, EPS (run through Ghostscript) and PSD included, on a file anyone can upload as "x.png".
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")

# Images are refused from their header, before their pixels are decoded, when decoding or resizing them would
# take far more memory than training on them needs:
# - more pixels than PIL's own decompression-bomb threshold (checked here, naming the file, whatever another
#   node pack set PIL.Image.MAX_IMAGE_PIXELS to): ~268 MB as 8-bit RGB, far more than any bucket needs;
MAX_IMAGE_PIXELS = 89_478_485
# - more elongated than ELONGATION_LIMIT times the dataset's most elongated bucket. An image is resized to
#   cover its bucket before the crop, so its long side becomes bucket side x (image aspect / bucket aspect):
#   this keeps that resize at most 4x the bucket's area and every resized side within 4 x max_side (an
#   8x200000 PNG of 3.5 KB was resized to 256x6,400,000, 6.9 GB).
ELONGATION_LIMIT = 4.0

# Text encoders read 77 (CLIP) to 512 (T5) tokens; a longer caption only costs encoding time (a 10 MB caption
# kept Cache captions busy for 14 minutes), so captions are capped well above any real one.
MAX_CAPTION_CHARS = DatasetConfig.MAX_CAPTION_CHARS
# A caption file is read up to this many bytes (UTF-8 takes at most 4 per character): a larger one is
# refused without being read whole.
MAX_CAPTION_BYTES = 4 * MAX_CAPTION_CHARS

ALLOW_ANY_PATH_ENV, any_path_allowed = files.ALLOW_ANY_PATH_ENV, files.any_path_allowed

@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    def __str__(self):
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class DatasetItem:
    """One training sample: an image file as it will be cropped, resized and (maybe) mirrored."""
    path: str
    caption: str
    repeats: int
    flip: bool
    original_size: tuple[int, int]   # (width, height) of the file
    bucket: Bucket
    crop: tuple[int, int]            # (left, top) offset of the crop in the resized image
    content_hash: str                # sha256 of the file's bytes
    # With shuffle_captions: the orders of the caption's tags that are cached, one drawn per step (else empty)
    caption_variants: tuple[str, ...] = ()
    caption_dropout: float = 0.0     # its folder's probability of the empty caption
    # masked loss: "" (none), "alpha" (the image's transparency) or the mask file's path; the sha256 of its
    # bytes, its size as displayed, and the lowest weight it gives (DatasetConfig.mask_min_value)
    mask: str = ""
    mask_hash: str = ""
    mask_size: tuple[int, int] = (0, 0)
    mask_min: float = 0.0
    is_reg: bool = False             # a regularisation image (DatasetConfig.is_reg)
    # edit pairs (Flux Kontext, Qwen-Image-Edit): the control image's path (the image before the edit; "" for
    # none), the sha256 of its bytes and its size as displayed
    control: str = ""
    control_hash: str = ""
    control_size: tuple[int, int] = (0, 0)
    control_prompt: str = ""         # Qwen-Image-Edit: DatasetConfig.control_prompt of its folder
    trigger_word: str = ""           # its folder's trigger word, and the class word that replaces it in the
    preservation_class: str = ""     # captions of differential output preservation (both or neither)

    def preserved(self, caption: str) -> str:
        """The caption of differential output preservation: `caption` (this item's caption, a variant of it, or
        the empty one) with the trigger word replaced by the class word, as ai-toolkit builds it; the caption
        itself where the item has no class word."""
        if not self.preservation_class:
            return caption
        return caption.replace(self.trigger_word, self.preservation_class)


@dataclass(frozen=True)
class Dataset:
    config: DatasetConfig
    root: str
    items: tuple[DatasetItem, ...]
    skipped: tuple[str, ...] = ()    # files that are not images
    duplicates: tuple[tuple[str, str], ...] = ()   # (file left out, the identical file kept)

    def __repr__(self):
        buckets = sorted({str(i.bucket) for i in self.items})
        reg = sum(i.is_reg for i in self.items)
        return (f"Dataset({self.root!r}, {len(self.items)} samples"
                + (f" ({reg} regularisation)" if reg else "") + f", buckets {buckets}, "
                f"{len(self.skipped)} non-image files skipped, {len(self.duplicates)} duplicates left out)")

    @property
    def captions(self) -> tuple[str, ...]:
        """Every caption training may draw (the shuffled variants where there are some)."""
        own = {(i, c) for i in self.items for c in (i.caption_variants or (i.caption,))}
        # differential output preservation's captions: each with its trigger word replaced by the class word
        return tuple(sorted({c for _, c in own} | {i.preserved(c) for i, c in own}))


def combine(datasets: list[Dataset]) -> Dataset:
    """The items of several datasets as one (each keeps its own captions, buckets and is_reg): what a YAML job
    with several datasets trains on, and what Combine training images gives. A batch never mixes buckets."""
    items = tuple(item for d in datasets for item in d.items)
    return dataclasses.replace(datasets[0], items=items, skipped=tuple(s for d in datasets for s in d.skipped),
                               duplicates=tuple(p for d in datasets for p in d.duplicates))


def caption_variants(caption: str, keep_tokens: int, count: int) -> tuple[str, ...]:
    """Up to `count` distinct orders of the caption's comma-separated tags with the first `keep_tokens` in
    place: its own order first, then shuffles. They depend only on the caption (a seed from its hash), so the
    same caption gives the same variants and their cached embeddings are found again."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    orders = math.factorial(len(rest))           # distinct orders: tags may repeat
    for repeated in _counts(rest):
        orders //= math.factorial(repeated)
    count = min(count, orders)
    rng = random.Random(hashlib.sha256(caption.encode()).digest())
    seen, variants = {tuple(rest)}, [", ".join(tags)]
    while len(variants) < count:
        shuffled = rest[:]
        rng.shuffle(shuffled)
        if tuple(shuffled) not in seen:
            seen.add(tuple(shuffled))
            variants.append(", ".join(fixed + shuffled))
    return tuple(variants)


def _counts(values: list[str]) -> list[int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return list(counts.values())


def make_buckets(resolution: int, min_side: int, max_side: int, step: int = 64) -> tuple[Bucket, ...]:
    """Buckets with sides multiple of `step` and area at most resolution² (kohya's scheme)."""
    area = resolution * resolution
    buckets = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add(Bucket(width, height))
            buckets.add(Bucket(height, width))
        width += step
    return tuple(sorted(buckets, key=lambda b: (b.width / b.height, b.width)))


def assign_bucket(size: tuple[int, int], config: DatasetConfig, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket of closest aspect ratio; an image too small for it (beyond max_upscale) gets a smaller
    bucket of its own size rounded down to multiples of 64 instead of being blown up, its sides between 64
    and max_side (a long thin image is scaled down to fit max_side rather than trained at its length)."""
    width, height = size
    aspect = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - aspect), -b.width * b.height))
    needed_scale = math.sqrt(best.width * best.height / (width * height))
    if needed_scale <= config.max_upscale:
        return best
    scale = min(config.max_upscale, config.max_side / max(width, height))

    def side(length: float) -> int:
        return min(config.max_side, max(64, int(length) // 64 * 64))
    return Bucket(side(width * scale), side(height * scale))


def crop_for(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize so the image covers the bucket, then centre-crop: returns ((resized w, h), (left, top))."""
    width, height = size
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    return resized, ((resized[0] - bucket.width) // 2, (resized[1] - bucket.height) // 2)


def load_image(item: DatasetItem) -> Image.Image:
    """The item's pixels, RGB, resized and cropped to its bucket, mirrored if it is a flipped copy."""
    with _open_scanned(item.path, "image", item.original_size) as img:
        return _fitted(_to_rgb(ImageOps.exif_transpose(img)), item)


def _open_scanned(path: str, kind: str, expected: tuple[int, int]) -> Image.Image:
    """A dataset's image file opened (not decoded) for reading its pixels. The file may have been replaced since
    the scan: one whose size is not the `expected` (width, height) the scan measured is refused, never decoded."""
    name = quoted(os.path.basename(path))
    try:
        img = Image.open(path, formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ConfigError(f"{kind} {name} is too large to decode safely ({e}); it changed since the folder was "
                          f"scanned: run Training images again") from None
    if sorted(img.size) != sorted(expected):
        size = img.size
        img.close()
        raise ConfigError(f"{kind} {name} is now {size[0]}x{size[1]} pixels, not the {expected[0]}x{expected[1]} "
                          f"it had when the folder was scanned: run Training images again")
    return img


def _fitted(img: Image.Image, item: DatasetItem) -> Image.Image:
    """An RGB image of the item's original size (as displayed) resized, cropped to its bucket, maybe mirrored."""
    resized, (left, top) = crop_for(item.original_size, item.bucket)
    img = img.resize(resized, Image.Resampling.LANCZOS)
    img = img.crop((left, top, left + item.bucket.width, top + item.bucket.height))
    return ImageOps.mirror(img) if item.flip else img


def load_control(item: DatasetItem) -> Image.Image:
    """The item's control image (edit pairs), RGB, as its training image is fitted to the bucket: first
    stretched to the training image's size where the two differ (as ai-toolkit resizes a control image to its
    target's), then resized, cropped and mirrored as load_image does, so the pair stays aligned pixel for pixel."""
    with _open_scanned(item.control, "control image", item.control_size) as img:
        img = _to_rgb(ImageOps.exif_transpose(img))
        if img.size != item.original_size:
            img = img.resize(item.original_size, Image.Resampling.LANCZOS)
        return _fitted(img, item)


def load_mask(item: DatasetItem, size: tuple[int, int]) -> torch.Tensor | None:
    """The item's loss weights at latent size (height, width): its mask cropped, resized and mirrored as its image
    is, in [mask_min, 1], shrunk by area averaging (kohya's); None when the item has no mask (an image without
    alpha under masked_loss alpha): it trains whole."""
    if not item.mask:
        return None
    alpha = item.mask == "alpha"
    path = item.path if alpha else item.mask
    expected = item.original_size if alpha else item.mask_size
    with _open_scanned(path, "image" if alpha else "mask", expected) as img:
        if alpha and not _has_alpha(img):   # (known from the header: nothing decoded)
            return None
        img = ImageOps.exif_transpose(img)
        if alpha:
            mask = img.convert("RGBA").getchannel("A")
        else:   # kohya reads a mask image's first channel
            mask = _to_rgb(img).getchannel("R")
            if mask.size != item.original_size:
                mask = mask.resize(item.original_size, Image.Resampling.BILINEAR)
        resized, (left, top) = crop_for(item.original_size, item.bucket)
        mask = mask.resize(resized, Image.Resampling.LANCZOS)
        mask = mask.crop((left, top, left + item.bucket.width, top + item.bucket.height))
    if item.flip:
        mask = ImageOps.mirror(mask)
    weights = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).clamp_(min=item.mask_min)
    return torch.nn.functional.interpolate(weights[None, None], size=size, mode="area")[0, 0].contiguous()


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)


def _to_rgb(img: Image.Image) -> Image.Image:
    # Palette, CMYK, 16-bit and alpha images are flattened to 8-bit RGB on white.
    if _has_alpha(img):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def _with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption.replace("[trigger]", "").strip(" ,")
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger)
    return f"{trigger}, {caption}" if caption else trigger


def list_image_files(root: str) -> list[tuple[str, int]]:
    """(path, repeats) of every file under root, in a stable order; N_name sub-folders repeat N times.
    Linked sub-folders are not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        relative = os.path.relpath(dirpath, root)
        repeats = 1
        for part in relative.split(os.sep):
            match = _REPEAT_FOLDER.match(part)
            if match:
                repeats = int(match.group(1))
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append((os.path.join(dirpath, name), repeats))
    return found


def has_image_files(root: str, look_at: int = 10_000) -> bool:
    """Whether root holds an image file (the check at Queue, before any model loads). After `look_at` entries
    without one it answers True: the scan when the node runs decides, and Queue stays quick."""
    seen = 0
    for _, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                return True
        seen += len(filenames) + len(dirnames)
        if seen >= look_at:
            return True
    return False


def unpaired_images(root: str, pair_root: str) -> list[str]:
    """Images under root (relative paths) without an image of the same name (any image extension) at the same
    place under pair_root: what Queue checks of a control_folder. Names only: nothing is opened."""
    def stems(folder: str) -> set[str]:
        return {os.path.splitext(os.path.relpath(path, folder))[0] for path, _ in list_image_files(folder)
                if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS}
    paired = stems(pair_root)
    return sorted(os.path.relpath(path, root) for path, _ in list_image_files(root)
                  if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
                  and os.path.splitext(os.path.relpath(path, root))[0] not in paired)


def listing_fingerprint(root: str) -> str:
    """Changes when any file under root is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for path, repeats in list_image_files(root):
        try:
            info = os.stat(path)
        except OSError:     # a dangling link: scan_dataset names it
            info = os.lstat(path)
        digest.update(f"{path}\0{repeats}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def most_elongated(buckets: tuple[Bucket, ...]) -> float:
    """Long side / short side of the dataset's most elongated bucket."""
    return max(max(b.width, b.height) / min(b.width, b.height) for b in buckets)


def scan_dataset(root: str, config: DatasetConfig, confine: bool | None = None,
                 on_progress: Callable[[int, int], None] | None = None, mask_root: str | None = None,
                 control_root: str | None = None) -> Dataset:
    """Read the folder into a Dataset, or raise ConfigError naming the file and the fix.

    confine: every image and caption file must lie inside `root` once links are resolved (a link to a file
    elsewhere is refused). None (the default) confines unless ERI_ALLOW_ANY_PATH=1 is set, the switch that
    also frees the folder itself; callers who already know pass a bool.
    on_progress(done, total) is called before each file: a caller may raise from it to stop the scan.
    mask_root: the directory of config.mask_folder (masked_loss mask_folder), resolved by the caller.
    control_root: the directory of config.control_folder (edit pairs), resolved by the caller."""
    if confine is None:
        confine = not any_path_allowed()
    if not os.path.isdir(root):
        raise ConfigError(f"folder {quoted(config.folder)} does not exist (looked for {root})")
    if config.caption_ext.lower() in IMAGE_EXTENSIONS:
        raise ConfigError(f"caption_ext {quoted(config.caption_ext)} is an image extension: captions would be "
                          f"read from images. Use .txt or another text extension")
    buckets = make_buckets(config.resolution, config.min_side, config.max_side)
    elongation_limit = ELONGATION_LIMIT * most_elongated(buckets)
    listing = list_image_files(root)
    masks = _mask_files(root, config, mask_root, confine)
    controls = _control_files(root, config, control_root, confine)
    items, skipped, duplicates, seen = [], [], [], {}
    for done, (path, repeats) in enumerate(listing):
        if on_progress:
            on_progress(done, len(listing))
        extension = os.path.splitext(path)[1].lower()
        if extension == config.caption_ext.lower():
            continue
        if extension not in IMAGE_EXTENSIONS:
            skipped.append(path)
            continue
        name = os.path.relpath(path, root)
        if confine and not files.inside(root, path):
            raise ConfigError(_links_outside("image", name, config))
        size, content_hash = _measure_image(path, name, config, elongation_limit)
        caption = _read_caption(path, root, config, confine)
        if caption is None:
            if not config.default_caption:
                caption_name = os.path.splitext(os.path.basename(path))[0] + config.caption_ext
                raise ConfigError(f"image {quoted(name)} has no caption file ({_unquoted(caption_name)}) and "
                                  f"default_caption is empty: add the caption file or set default_caption")
            caption = config.default_caption
        caption = _with_trigger(caption, config.trigger_word)
        # "[trigger]" written many times over multiplies the trigger word: room for one caption and one
        # trigger word at their caps, no more.
        if len(caption) > 2 * MAX_CAPTION_CHARS:
            raise ConfigError(f"the caption of image {quoted(name)} in folder {quoted(config.folder)} is "
                              f"{len(caption):,} characters with the trigger word, more than the "
                              f"{2 * MAX_CAPTION_CHARS:,} a caption with its trigger word may have: shorten the "
                              f"caption or trigger_word")
        variants = caption_variants(caption, config.keep_tokens, config.caption_variants) \
            if config.shuffle_captions else ()
        bucket = assign_bucket(size, config, buckets)
        _, crop = crop_for(size, bucket)
        control = _control_of(name, config, controls)
        # the same bytes twice would silently double their weight (repeats do that); an edit pair is its two images
        key = (content_hash, control.get("control_hash", ""))
        if key in seen:
            duplicates.append((path, seen[key]))
            continue
        seen[key] = path
        mask = _mask_of(path, name, size, content_hash, config, masks, elongation_limit)
        mask.update(control)
        for flip in ((False, True) if config.flip else (False,)):
            items.append(DatasetItem(path, caption, repeats, flip, size, bucket, crop, content_hash, variants,
                                     config.caption_dropout, **mask, is_reg=config.is_reg,
                                     **({"trigger_word": config.trigger_word,
                                         "preservation_class": config.preservation_class}
                                        if config.preservation_class.strip() else {})))
    if not items:
        raise ConfigError(f"folder {quoted(config.folder)} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                          f"{len(skipped)} other files were skipped. Put training images in {root}")
    if duplicates:
        logging.warning("EriDiffusion: %d duplicate image(s) in %s left out: %s", len(duplicates),
                        quoted(config.folder),
                        "; ".join(f"{quoted(os.path.relpath(a, root))} is identical to "
                                  f"{quoted(os.path.relpath(b, root))}" for a, b in duplicates[:5])
                        + (" ..." if len(duplicates) > 5 else ""))
    return Dataset(config, root, tuple(items), tuple(skipped), tuple(duplicates))


def _mask_files(root: str, config: DatasetConfig, mask_root: str | None, confine: bool) -> dict[str, str]:
    """With masked_loss mask_folder: {image path relative to root without extension: mask file}; else {}."""
    if config.masked_loss != "mask_folder":
        return {}
    return _paired_files(root, mask_root, "mask_folder", "mask", dataclasses.replace(config, folder=config.mask_folder),
                         confine, "create it with a mask per image",
                         "its masks would be trained on as images. Put the masks in a folder of their own")


def _control_files(root: str, config: DatasetConfig, control_root: str | None, confine: bool) -> dict[str, str]:
    """With a control_folder: {image path relative to root without extension: control image}; else {}."""
    if not config.control_folder.strip():
        return {}
    return _paired_files(root, control_root, "control_folder", "control image",
                         dataclasses.replace(config, folder=config.control_folder), confine,
                         "create it with a control image per training image, or clear control_folder",
                         "each image would be its own control. Put the control images in a folder of their own")


def _paired_files(root: str, pair_root: str | None, input_name: str, kind: str, config: DatasetConfig,
                  confine: bool, missing_fix: str, itself: str) -> dict[str, str]:
    """{path relative to pair_root without extension: image file} of a folder laid out as the training folder
    (masks, control images; config.folder is its name); the first extension in sorted order wins."""
    if pair_root is None or not os.path.isdir(pair_root):
        raise ConfigError(f"{input_name} {quoted(config.folder)} does not exist"
                          + (f" (looked for {pair_root})" if pair_root else "") + f": {missing_fix}")
    if os.path.realpath(pair_root) == os.path.realpath(root):
        raise ConfigError(f"{input_name} {quoted(config.folder)} is the training folder itself: {itself}")
    found = {}
    for path, _ in list_image_files(pair_root):
        relative, extension = os.path.splitext(os.path.relpath(path, pair_root))
        if extension.lower() not in IMAGE_EXTENSIONS or relative in found:
            continue
        if confine and not files.inside(pair_root, path):
            raise ConfigError(_links_outside(kind, relative + extension, config))
        found[relative] = path
    return found


def _control_of(name: str, config: DatasetConfig, controls: dict[str, str]) -> dict:
    """The DatasetItem fields of an image's control image (none without a control_folder)."""
    if not config.control_folder.strip():
        return {}
    stem = os.path.splitext(name)[0]
    control_path = controls.get(stem)
    if control_path is None:
        raise ConfigError(f"image {quoted(name)} has no control image in control_folder "
                          f"{quoted(config.control_folder)} (a {_unquoted(stem)}.png, or another image extension, "
                          f"there): add it, or clear control_folder")
    control_name = stem + os.path.splitext(control_path)[1]
    size, control_hash = _measure_image(control_path, control_name,
                                        dataclasses.replace(config, folder=config.control_folder), math.inf)
    return dict(control=control_path, control_hash=control_hash, control_size=size,
                control_prompt=config.control_prompt)


def _mask_of(path: str, name: str, size: tuple[int, int], content_hash: str, config: DatasetConfig,
             masks: dict[str, str], elongation_limit: float) -> dict:
    """The DatasetItem fields of an image's mask (none without masked_loss)."""
    if config.masked_loss == "off":
        return {}
    if config.masked_loss == "alpha":
        return dict(mask="alpha", mask_hash=content_hash, mask_size=size, mask_min=config.mask_min_value)
    mask_path = masks.get(os.path.splitext(name)[0])
    if mask_path is None:
        raise ConfigError(f"image {quoted(name)} has no mask in mask_folder {quoted(config.mask_folder)} (a "
                          f"{os.path.splitext(name)[0]}.png, or another image extension, there): add it, or set "
                          f"masked_loss to off")
    mask_name = os.path.splitext(name)[0] + os.path.splitext(mask_path)[1]
    mask_size, mask_hash = _measure_image(mask_path, mask_name, dataclasses.replace(config, folder=config.mask_folder),
                                          math.inf)
    return dict(mask=mask_path, mask_hash=mask_hash, mask_size=mask_size, mask_min=config.mask_min_value)


def _unquoted(text: str, limit: int = 100) -> str:
    """A file name inside a sentence: control characters escaped as repr does, cut to `limit` characters."""
    shown = repr(text[:limit])[1:-1]
    return shown + "…" if len(text) > limit else shown


def _links_outside(kind: str, name: str, config: DatasetConfig) -> str:
    return (f"{kind} {quoted(name)} in folder {quoted(config.folder)} is a link to a file outside the folder, "
            f"and only files inside it are read: copy the file into the folder, or, on a single-user machine, "
            f"start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow links that lead out")


def _measure_image(path: str, name: str, config: DatasetConfig,
                   elongation_limit: float) -> tuple[tuple[int, int], str]:
    """(width, height) as displayed (EXIF orientation applied) and the sha256 of the file's bytes. The size
    limits are checked from the header, before any pixel is decoded; then the image is decoded once, so a
    damaged file is named now rather than in the middle of caching."""
    where = f"image {quoted(name)} in folder {quoted(config.folder)}"
    try:
        info = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror}; a link to nothing?): fix or remove it") from None
    if not stat.S_ISREG(info.st_mode):   # a pipe or a device would block or never end
        raise ConfigError(f"{where} is not a regular file: remove it")
    with open(path, "rb") as f:
        try:
            with Image.open(f, formats=IMAGE_FORMATS) as img:
                width, height = img.size
                _check_image_size(img.size, name, where, config, elongation_limit)
                img.load()
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except ConfigError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ConfigError(f"{where} is too large to decode safely ({e}): resize it to at most "
                              f"{MAX_IMAGE_PIXELS:,} pixels") from None
        except UnidentifiedImageError:
            raise ConfigError(f"{where} cannot be read (it is not a {', '.join(IMAGE_FORMATS)} image): fix or "
                              f"remove the file") from None
        except Exception as e:   # decoders raise OSError, SyntaxError, ValueError, struct.error... on damage
            raise ConfigError(f"{where} cannot be read ({_unquoted(str(e), 120)}): fix or remove the "
                              f"file") from None
        f.seek(0)
        content_hash = hashlib.file_digest(f, "sha256").hexdigest()   # in chunks, not the whole file at once
    # As ImageOps.exif_transpose (in load_image) will turn it: orientations 5-8 swap the sides.
    return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), content_hash


def _check_image_size(size: tuple[int, int], name: str, where: str, config: DatasetConfig,
                      elongation_limit: float) -> None:
    # Pixels and elongation do not depend on the EXIF orientation, so the header's size is enough.
    width, height = size
    if min(size) < 8:
        raise ConfigError(f"image {quoted(name)} is {width}x{height} pixels: too small to train on; remove it "
                          f"from folder {quoted(config.folder)}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ConfigError(f"{where} is {width}x{height} pixels ({width * height:,}), more than the "
                          f"{MAX_IMAGE_PIXELS:,} an image may have: resize it (training uses at most "
                          f"{config.max_side} pixels a side)")
    elongation = max(size) / min(size)
    if elongation > elongation_limit:
        raise ConfigError(f"{where} is {width}x{height} pixels, {elongation:.1f}:1, more elongated than the "
                          f"{elongation_limit:g}:1 this dataset allows ({ELONGATION_LIMIT:g} times its most "
                          f"elongated bucket at resolution {config.resolution}, min_side {config.min_side}, "
                          f"max_side {config.max_side}): crop it, or lower min_side or raise max_side")


def _read_caption(image_path: str, root: str, config: DatasetConfig, confine: bool) -> str | None:
    """The caption file's text with whitespace collapsed, or None when the image has none."""
    caption_path = os.path.splitext(image_path)[0] + config.caption_ext
    if not os.path.lexists(caption_path):
        return None
    name = os.path.relpath(caption_path, root)
    if confine and not files.inside(root, caption_path):
        raise ConfigError(_links_outside("caption file", name, config))
    if not os.path.isfile(caption_path):   # a folder, or a link to nothing, of that name is no caption
        return None
    where = f"caption file {quoted(name)} in folder {quoted(config.folder)}"
    with open(caption_path, "rb") as f:
        raw = f.read(MAX_CAPTION_BYTES + 1)
        if len(raw) > MAX_CAPTION_BYTES:
            raise ConfigError(f"{where} is {os.fstat(f.fileno()).st_size:,} bytes, longer than a caption may be "
                              f"({MAX_CAPTION_CHARS:,} characters; text encoders read at most 77 to 512 tokens): "
                              f"shorten it")
    caption = " ".join(raw.decode("utf-8", errors="replace").split())
    if len(caption) > MAX_CAPTION_CHARS:
        raise ConfigError(f"{where} has {len(caption):,} characters, more than the {MAX_CAPTION_CHARS:,} a "
                          f"caption may have (text encoders read at most 77 to 512 tokens): shorten it")
    return caption
