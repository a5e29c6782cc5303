"""Dataset folders and settings as an attacker (or an accident) makes them: a caption extension that climbs out
of the folder, links to files elsewhere, images whose size would exhaust memory, captions of megabytes. Each
is refused with a ConfigError naming the file or setting and what to change, and nothing outside the folder
is read."""
import os
import struct
import zlib

import pytest
from PIL import Image

from conftest import write_images
from eridiffusion.trainers import data
from eridiffusion.trainers.config import ConfigError, DatasetConfig

SECRET = "TOP-SECRET-7f3a the server's private file"


def config(**kw):
    return DatasetConfig(**{"folder": "set", "resolution": 64, "min_side": 64, "max_side": 128, **kw})


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data: decoding it fails ("truncated"), so an
    error about its size proves the size was checked from the header, before any decoding."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b""))


@pytest.fixture
def dataset_and_secret(tmp_path, monkeypatch):
    """A dataset folder `set` and, beside it, a private file; ERI_ALLOW_ANY_PATH unset."""
    monkeypatch.delenv("ERI_ALLOW_ANY_PATH", raising=False)
    root = tmp_path / "set"
    root.mkdir()
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    return root, outside


# ----------------------------------------------------------------------------------------- caption_ext
@pytest.mark.parametrize("ext", ["./../../secret.txt", "./../../../secret.txt", "/../secret.txt", ".txt/../x",
                                 "txt", ".", "", ".t xt", ".tx\x00t", ".a" * 10, "..txt", ".tæt"])
def test_a_caption_ext_that_is_not_a_plain_extension_is_refused_naming_caption_ext(ext):
    with pytest.raises(ConfigError, match=r"caption_ext must be a dot and 1 to 16 letters, digits, _ or -"):
        config(caption_ext=ext)


@pytest.mark.parametrize("ext", [".txt", ".caption", ".tag_v2", ".TXT", ".a-b", ".x" + "y" * 15])
def test_plain_caption_extensions_are_accepted(ext):
    assert config(caption_ext=ext).caption_ext == ext


def test_the_caption_ext_traversal_reads_nothing_outside_the_folder(dataset_and_secret):
    # The reported attack: a folder named "<image stem>." makes "<stem>" + "./../../secret.txt" a path that
    # resolves, and the caption's text came back in an error.
    root, outside = dataset_and_secret
    write_images(root, [(64, 64)], captions=False, prefix="a")
    (root / "a.").mkdir()
    assert (root / "a./../../private/secret.txt").read_text() == SECRET   # the path the attack relied on
    with pytest.raises(ConfigError) as refused:
        data.scan_dataset(str(root), config(caption_ext="./../private/secret.txt"))
    assert "caption_ext" in str(refused.value) and "TOP-SECRET" not in str(refused.value)


def test_a_very_long_caption_ext_is_quoted_only_in_part():
    with pytest.raises(ConfigError) as refused:
        config(caption_ext="./" + "../" * 10_000 + "secret.txt")
    assert "caption_ext" in str(refused.value) and len(str(refused.value)) < 400


def test_a_caption_ext_that_is_an_image_extension_is_refused(tmp_path):
    write_images(tmp_path, [(64, 64)])
    with pytest.raises(ConfigError, match=r"caption_ext '.png' is an image extension"):
        data.scan_dataset(str(tmp_path), config(caption_ext=".png"))


# ------------------------------------------------------------------------------------------------ links
def test_a_caption_file_linking_outside_the_folder_is_refused_without_reading_it(dataset_and_secret):
    root, outside = dataset_and_secret
    write_images(root, [(64, 64)], captions=False)
    (root / "img0.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(ConfigError) as refused:
        data.scan_dataset(str(root), config())
    message = str(refused.value)
    assert ("caption file 'img0.txt' in folder 'set' is a link to a file outside the folder" in message
            and "ERI_ALLOW_ANY_PATH=1" in message and "TOP-SECRET" not in message)


def test_an_image_linking_outside_the_folder_is_refused(dataset_and_secret):
    root, outside = dataset_and_secret
    write_images(root, [(64, 64)])
    write_images(outside, [(64, 64)], prefix="private", seed=5)
    (root / "sub").mkdir()
    (root / "sub" / "borrowed.png").symlink_to(outside / "private0.png")
    with pytest.raises(ConfigError, match=r"image 'sub/borrowed.png' in folder 'set' is a link to a file outside "
                                          r"the folder.*ERI_ALLOW_ANY_PATH=1"):
        data.scan_dataset(str(root), config(default_caption="x"))


def test_a_link_to_a_folder_outside_is_not_entered(dataset_and_secret):
    root, outside = dataset_and_secret
    write_images(root, [(64, 64)])
    write_images(outside, [(64, 64)], prefix="private", seed=5)
    (root / "more").symlink_to(outside, target_is_directory=True)
    ds = data.scan_dataset(str(root), config())
    assert [os.path.basename(i.path) for i in ds.items] == ["img0.png"]


def test_links_that_stay_inside_the_folder_are_read(dataset_and_secret):
    root, _ = dataset_and_secret
    write_images(root / "originals", [(64, 64)], captions=False)
    os.rename(root / "originals" / "img0.png", root / "originals" / "img0.bin")   # not an image name: skipped
    (root / "shown.png").symlink_to(root / "originals" / "img0.bin")
    (root / "captions").mkdir()
    (root / "captions" / "shown.txt").write_text("a linked caption")
    (root / "shown.txt").symlink_to(root / "captions" / "shown.txt")
    ds = data.scan_dataset(str(root), config())
    assert [(os.path.basename(i.path), i.caption) for i in ds.items] == [("shown.png", "a linked caption")]


def test_links_outside_are_read_when_confinement_is_off_or_any_path_is_allowed(dataset_and_secret, monkeypatch):
    root, outside = dataset_and_secret
    write_images(root, [(64, 64)], captions=False)
    (root / "img0.txt").symlink_to(outside / "secret.txt")
    assert data.scan_dataset(str(root), config(), confine=False).captions == (SECRET,)
    monkeypatch.setenv("ERI_ALLOW_ANY_PATH", "1")
    assert data.scan_dataset(str(root), config()).captions == (SECRET,)


def test_a_pipe_named_like_an_image_is_refused_instead_of_blocking(tmp_path):
    write_images(tmp_path, [(64, 64)])
    os.mkfifo(tmp_path / "stream.png")
    with pytest.raises(ConfigError, match=r"image 'stream.png' in folder 'set' is not a regular file"):
        data.scan_dataset(str(tmp_path), config(default_caption="x"))


def test_a_file_of_another_format_named_like_an_image_is_not_decoded(tmp_path):
    # PIL opens EPS (through Ghostscript) whatever the file is called; training images are only the listed formats.
    (tmp_path / "drawing.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with Image.open(tmp_path / "drawing.png") as unrestricted:
        assert unrestricted.format == "EPS"
    with pytest.raises(ConfigError, match=r"image 'drawing.png' in folder 'set' cannot be read \(it is not a PNG, "
                                          r"JPEG, WEBP, BMP, GIF, TIFF image\)"):
        data.scan_dataset(str(tmp_path), config(default_caption="x"))


# ------------------------------------------------------------------------------------------ image sizes
def test_an_image_far_more_elongated_than_any_bucket_is_refused_from_its_header(tmp_path):
    # 8x200000 was resized to 256x6,400,000 before the crop (6.9 GB). The buckets of resolution 512 with sides
    # 256-1024 reach 4:1, so the limit is 16:1.
    (tmp_path / "strip.png").write_bytes(png_header(8, 200_000))
    with pytest.raises(ConfigError, match=r"image 'strip.png' in folder 'set' is 8x200000 pixels, 25000.0:1, more "
                                          r"elongated than the 16:1 this dataset allows .*: crop it"):
        data.scan_dataset(str(tmp_path), config(resolution=512, min_side=256, max_side=1024, default_caption="x"))


def test_the_elongation_limit_follows_the_buckets_and_bounds_the_resize_before_the_crop(tmp_path):
    cfg = config(resolution=512, min_side=256, max_side=1024, default_caption="x")
    Image.new("RGB", (64, 1024), "white").save(tmp_path / "tall.png")        # 16:1: at the limit
    item, = data.scan_dataset(str(tmp_path), cfg).items
    resized, _ = data.crop_for(item.original_size, item.bucket)
    assert resized[0] * resized[1] <= 4 * item.bucket.width * item.bucket.height
    assert max(resized) <= 4 * cfg.max_side
    Image.new("RGB", (64, 1088), "white").save(tmp_path / "taller.png")      # 17:1
    with pytest.raises(ConfigError, match=r"'taller.png' .* is 64x1088 pixels, 17.0:1"):
        data.scan_dataset(str(tmp_path), cfg)
    Image.new("RGB", (64, 2048), "white").save(tmp_path / "taller.png")      # fine with more elongated buckets
    assert len(data.scan_dataset(str(tmp_path), config(resolution=512, min_side=64, max_side=4096,
                                                      default_caption="x")).items) == 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")   # PIL warns first; the error is ours
def test_an_image_of_more_pixels_than_the_limit_is_refused_from_its_header(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_header(10_000, 10_000))
    with pytest.raises(ConfigError, match=r"image 'huge.png' in folder 'set' is 10000x10000 pixels \(100,000,000\), "
                                          r"more than the 89,478,485 an image may have: resize it"):
        data.scan_dataset(str(tmp_path), config(default_caption="x"))


def test_a_decompression_bomb_names_the_file(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(30_000, 30_000))
    with pytest.raises(ConfigError, match=r"image 'bomb.png' in folder 'set' is too large to decode safely.*resize "
                                          r"it to at most 89,478,485 pixels"):
        data.scan_dataset(str(tmp_path), config(default_caption="x"))


def test_the_pixel_limit_holds_when_another_pack_turned_off_pils_own_check(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    (tmp_path / "bomb.png").write_bytes(png_header(30_000, 30_000))
    with pytest.raises(ConfigError, match=r"image 'bomb.png' in folder 'set' is 30000x30000 pixels"):
        data.scan_dataset(str(tmp_path), config(default_caption="x"))


def test_the_fallback_bucket_of_a_small_long_image_honours_max_side():
    # An 8x50000 image was trained at 64x49984 although max_side was 2048.
    cfg = DatasetConfig(folder="set")
    buckets = data.make_buckets(cfg.resolution, cfg.min_side, cfg.max_side)
    for size in [(8, 50_000), (50_000, 8), (100, 3000), (300, 4000)]:
        bucket = data.assign_bucket(size, cfg, buckets)
        assert 64 <= min(bucket.width, bucket.height) and max(bucket.width, bucket.height) <= cfg.max_side
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert (bucket.width >= bucket.height) == (size[0] >= size[1])
    assert data.assign_bucket((100, 3000), cfg, buckets) == data.Bucket(64, 2048)   # scaled to 68x2048


def test_an_image_replaced_by_a_larger_one_after_the_scan_is_not_decoded(tmp_path):
    write_images(tmp_path, [(64, 64)])
    item, = data.scan_dataset(str(tmp_path), config()).items
    (tmp_path / "img0.png").write_bytes(png_header(8000, 8000))
    with pytest.raises(ConfigError, match=r"image 'img0.png' is now 8000x8000 pixels, not the 64x64 it had when the "
                                          r"folder was scanned: run Training images again"):
        data.load_image(item)


# ---------------------------------------------------------------------------------------------- captions
def test_a_caption_file_of_megabytes_is_refused_by_its_size(tmp_path):
    write_images(tmp_path, [(64, 64)])
    (tmp_path / "img0.txt").write_text("word " * 2_000_000)
    with pytest.raises(ConfigError, match=r"caption file 'img0.txt' in folder 'set' is 10,000,000 bytes, longer "
                                          r"than a caption may be \(8,192 characters.*: shorten it"):
        data.scan_dataset(str(tmp_path), config())


def test_a_caption_longer_than_the_cap_is_refused_naming_its_length(tmp_path):
    write_images(tmp_path, [(64, 64), (64, 64)])
    (tmp_path / "img0.txt").write_text("x" * data.MAX_CAPTION_CHARS)
    (tmp_path / "img1.txt").write_text("y" * (data.MAX_CAPTION_CHARS + 1))
    with pytest.raises(ConfigError, match=r"caption file 'img1.txt' in folder 'set' has 8,193 characters, more "
                                          r"than the 8,192 a caption may have .*: shorten it"):
        data.scan_dataset(str(tmp_path), config())
    (tmp_path / "img1.txt").write_text("y" * 100 + " \n" * 10_000)   # whitespace collapses: it fits
    assert len(data.scan_dataset(str(tmp_path), config()).items) == 2


def test_a_trigger_word_repeated_by_the_caption_cannot_exceed_twice_the_cap(tmp_path):
    write_images(tmp_path, [(64, 64)])
    (tmp_path / "img0.txt").write_text("x" * data.MAX_CAPTION_CHARS)   # a full caption and a trigger word fit
    assert len(data.scan_dataset(str(tmp_path), config(trigger_word="t" * 1000)).captions[0]) == 8192 + 1002
    (tmp_path / "img0.txt").write_text("[trigger]" * 900)
    with pytest.raises(ConfigError, match=r"the caption of image 'img0.png' in folder 'set' is 900,000 characters "
                                          r"with the trigger word, more than the 16,384 .*shorten the caption or "
                                          r"trigger_word"):
        data.scan_dataset(str(tmp_path), config(trigger_word="t" * 1000))


@pytest.mark.parametrize("name", ["default_caption", "trigger_word"])
def test_default_caption_and_trigger_word_are_capped_like_captions(name):
    with pytest.raises(ConfigError, match=rf"{name} is 10,000 characters, more than the 8,192 a caption may have"):
        config(**{name: "w" * 10_000})


# --------------------------------------------------------------------------------------- other settings
def test_messages_quote_a_long_folder_name_only_in_part(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as refused:
        data.scan_dataset(str(tmp_path / "missing"), config(folder="f" * 100_000))
    assert len(str(refused.value)) < 600


def test_min_side_above_resolution_is_refused_instead_of_leaving_no_bucket():
    with pytest.raises(ConfigError, match=r"min_side \(256\) must be at most resolution \(128\)"):
        config(resolution=128, min_side=256, max_side=512)


def test_max_upscale_must_be_a_finite_number():
    with pytest.raises(ConfigError, match="max_upscale must be a finite number"):
        config(max_upscale=float("nan"))


def test_a_scan_stops_when_its_progress_callback_raises(tmp_path):
    write_images(tmp_path, [(64, 64)] * 5)
    seen = []

    class Stop(Exception):
        pass

    def on_progress(done, total):
        seen.append((done, total))
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        data.scan_dataset(str(tmp_path), config(), on_progress=on_progress)
    assert seen == [(0, 10), (1, 10), (2, 10)]    # 5 images and 5 captions listed; stopped before the third
