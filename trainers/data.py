"""Training images: folder scan, captions, kohya repeat folders and multi-resolution aspect buckets."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ConfigError, DatasetConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


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


@dataclass(frozen=True)
class Dataset:
    config: DatasetConfig
    root: str
    items: tuple[DatasetItem, ...]
    skipped: tuple[str, ...] = ()    # files that are not images
    duplicates: tuple[tuple[str, str], ...] = ()   # (file left out, the identical file kept)

    def __repr__(self):
        buckets = sorted({str(i.bucket) for i in self.items})
        return (f"Dataset({self.root!r}, {len(self.items)} samples, buckets {buckets}, "
                f"{len(self.skipped)} non-image files skipped, {len(self.duplicates)} duplicates left out)")

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(sorted({i.caption for i in self.items}))


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
    bucket of its own size rounded down to multiples of 64 instead of being blown up."""
    width, height = size
    aspect = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - aspect), -b.width * b.height))
    needed_scale = math.sqrt(best.width * best.height / (width * height))
    if needed_scale <= config.max_upscale:
        return best
    scale = config.max_upscale
    return Bucket(max(64, int(width * scale) // 64 * 64), max(64, int(height * scale) // 64 * 64))


def crop_for(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize so the image covers the bucket, then centre-crop: returns ((resized w, h), (left, top))."""
    width, height = size
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    return resized, ((resized[0] - bucket.width) // 2, (resized[1] - bucket.height) // 2)


def load_image(item: DatasetItem) -> Image.Image:
    """The item's pixels, RGB, resized and cropped to its bucket, mirrored if it is a flipped copy."""
    with Image.open(item.path) as img:
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        resized, (left, top) = crop_for(item.original_size, item.bucket)
        img = img.resize(resized, Image.Resampling.LANCZOS)
        img = img.crop((left, top, left + item.bucket.width, top + item.bucket.height))
    if item.flip:
        img = ImageOps.mirror(img)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    # Palette, CMYK, 16-bit and alpha images are flattened to 8-bit RGB on white.
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def _read_caption(image_path: str, config: DatasetConfig) -> str | None:
    caption_path = os.path.splitext(image_path)[0] + config.caption_ext
    if os.path.isfile(caption_path):
        with open(caption_path, encoding="utf-8", errors="replace") as f:
            return " ".join(f.read().split())
    return None


def _with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption.replace("[trigger]", "").strip(" ,")
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger)
    return f"{trigger}, {caption}" if caption else trigger


def list_image_files(root: str) -> list[tuple[str, int]]:
    """(path, repeats) of every file under root, in a stable order; N_name sub-folders repeat N times."""
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


def listing_fingerprint(root: str) -> str:
    """Changes when any file under root is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for path, repeats in list_image_files(root):
        stat = os.stat(path)
        digest.update(f"{path}\0{repeats}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def scan_dataset(root: str, config: DatasetConfig) -> Dataset:
    """Read the folder into a Dataset, or raise ConfigError naming the file and the fix."""
    if not os.path.isdir(root):
        raise ConfigError(f"folder {config.folder!r} does not exist (looked for {root})")
    buckets = make_buckets(config.resolution, config.min_side, config.max_side)
    items, skipped, duplicates, seen = [], [], [], {}
    for path, repeats in list_image_files(root):
        if os.path.splitext(path)[1].lower() == config.caption_ext:
            continue
        if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            skipped.append(path)
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            with Image.open(path) as img:
                img.load()
                size = ImageOps.exif_transpose(img).size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ConfigError(f"image {os.path.relpath(path, root)!r} in folder {config.folder!r} cannot be read "
                              f"({e}); fix or remove the file") from e
        if min(size) < 8:
            raise ConfigError(f"image {os.path.relpath(path, root)!r} is {size[0]}x{size[1]} pixels: too small "
                              f"to train on; remove it")
        caption = _read_caption(path, config)
        if caption is None:
            if not config.default_caption:
                raise ConfigError(
                    f"image {os.path.relpath(path, root)!r} has no caption file "
                    f"({os.path.splitext(os.path.basename(path))[0]}{config.caption_ext}) and default_caption is "
                    f"empty: add the caption file or set default_caption")
            caption = config.default_caption
        caption = _with_trigger(caption, config.trigger_word)
        bucket = assign_bucket(size, config, buckets)
        _, crop = crop_for(size, bucket)
        content_hash = hashlib.sha256(data).hexdigest()
        if content_hash in seen:   # the same bytes twice would silently double their weight; repeats do that
            duplicates.append((path, seen[content_hash]))
            continue
        seen[content_hash] = path
        for flip in ((False, True) if config.flip else (False,)):
            items.append(DatasetItem(path, caption, repeats, flip, size, bucket, crop, content_hash))
    if not items:
        raise ConfigError(f"folder {config.folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                          f"{len(skipped)} other files were skipped. Put training images in {root}")
    if duplicates:
        logging.warning("EriDiffusion: %d duplicate image(s) in %r left out: %s", len(duplicates), config.folder,
                        "; ".join(f"{os.path.relpath(a, root)!r} is identical to {os.path.relpath(b, root)!r}"
                                  for a, b in duplicates[:5]) + (" ..." if len(duplicates) > 5 else ""))
    return Dataset(config, root, tuple(items), tuple(skipped), tuple(duplicates))
