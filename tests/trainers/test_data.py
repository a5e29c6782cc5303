"""Training images: buckets, captions, repeat folders, and clear errors for bad folders."""
import math

import pytest
from PIL import Image

from conftest import write_images
from eridiffusion.trainers import data
from eridiffusion.trainers.config import ConfigError, DatasetConfig


def config(**kw):
    return DatasetConfig(**{"folder": "set", "resolution": 512, "min_side": 256, "max_side": 1024, **kw})


def test_buckets_have_sides_multiple_of_64_within_limits_and_area_at_most_resolution_squared():
    buckets = data.make_buckets(1024, 256, 2048)
    assert data.Bucket(1024, 1024) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 256 <= b.width <= 2048 and 256 <= b.height <= 2048
        assert b.width * b.height <= 1024 * 1024
        assert b.width * b.height >= 0.85 * 1024 * 1024 or max(b.width, b.height) == 2048 or min(b.width, b.height) == 256


def test_each_image_goes_to_the_bucket_of_closest_aspect_ratio():
    cfg = config()
    buckets = data.make_buckets(512, 256, 1024)
    for size in [(1000, 1000), (1600, 900), (900, 1600), (3000, 1000)]:
        chosen = data.assign_bucket(size, cfg, buckets)
        error = abs(math.log(chosen.width / chosen.height) - math.log(size[0] / size[1]))
        assert all(error <= abs(math.log(b.width / b.height) - math.log(size[0] / size[1])) + 1e-9 for b in buckets)


def test_small_images_get_a_smaller_bucket_instead_of_being_upscaled_beyond_the_limit():
    cfg = config(max_upscale=1.0)
    bucket = data.assign_bucket((300, 200), cfg, data.make_buckets(512, 256, 1024))
    assert bucket.width <= 300 and bucket.height <= 200
    assert bucket.width % 64 == 0 and bucket.height % 64 == 0
    allowed = config(max_upscale=4.0)
    assert data.assign_bucket((300, 200), allowed, data.make_buckets(512, 256, 1024)).width > 300


def test_crop_covers_the_bucket_and_is_centred():
    resized, (left, top) = data.crop_for((1600, 900), data.Bucket(512, 256))
    assert resized[0] >= 512 and resized[1] >= 256
    assert left == (resized[0] - 512) // 2 and top == (resized[1] - 256) // 2


def test_captions_trigger_word_default_caption_and_repeat_folders(tmp_path):
    write_images(tmp_path, [(64, 64)], prefix="a")
    write_images(tmp_path / "3_person", [(64, 64)], prefix="b", seed=1)
    (tmp_path / "3_person" / "b0.txt").write_text("[trigger] smiling")
    write_images(tmp_path, [(64, 64)], captions=False, prefix="c", seed=2)
    ds = data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64, trigger_word="ohwx",
                                                 default_caption="a photo"))
    by_name = {item.path.split("/")[-1]: item for item in ds.items}
    assert by_name["a0.png"].caption == "ohwx, a photo of pattern 0" and by_name["a0.png"].repeats == 1
    assert by_name["b0.png"].caption == "ohwx smiling" and by_name["b0.png"].repeats == 3
    assert by_name["c0.png"].caption == "ohwx, a photo"


def test_flip_adds_a_mirrored_copy_of_every_image(tmp_path):
    write_images(tmp_path, [(64, 64), (64, 64)])
    ds = data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64, flip=True))
    assert len(ds.items) == 4 and sorted(i.flip for i in ds.items) == [False, False, True, True]
    flipped = next(i for i in ds.items if i.flip)
    plain = next(i for i in ds.items if not i.flip and i.path == flipped.path)
    assert data.load_image(flipped).transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes() == data.load_image(plain).tobytes()


def test_rgba_palette_and_16_bit_images_are_converted_to_rgb(tmp_path):
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(tmp_path / "alpha.png")
    Image.new("P", (64, 64), 3).save(tmp_path / "palette.png")
    Image.new("I;16", (64, 64), 30000).save(tmp_path / "deep.png")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    ds = data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64, default_caption="x"))
    for item in ds.items:
        assert data.load_image(item).mode == "RGB"


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="has no images"):
        data.scan_dataset(str(tmp_path), config())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        data.scan_dataset(str(tmp_path / "nope"), config())


def test_corrupt_image_names_the_file(tmp_path):
    write_images(tmp_path, [(64, 64)])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"'broken.png'.*cannot be read"):
        data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64))


def test_non_image_files_are_skipped_and_counted(tmp_path):
    write_images(tmp_path, [(64, 64)])
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "model.ckpt").write_bytes(b"\0" * 10)
    ds = data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64))
    assert len(ds.items) == 1 and len(ds.skipped) == 2


def test_image_without_caption_and_without_default_caption_is_a_clear_error(tmp_path):
    write_images(tmp_path, [(64, 64)], captions=False)
    with pytest.raises(ConfigError, match=r"'img0.png' has no caption file \(img0.txt\).*set default_caption"):
        data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64))


def test_one_pixel_image_is_a_clear_error(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ConfigError, match="'dot.png' is 1x1 pixels"):
        data.scan_dataset(str(tmp_path), config(default_caption="x"))


def test_listing_fingerprint_changes_when_a_file_changes(tmp_path):
    write_images(tmp_path, [(64, 64)])
    before = data.listing_fingerprint(str(tmp_path))
    assert data.listing_fingerprint(str(tmp_path)) == before
    (tmp_path / "img0.txt").write_text("a different, longer caption")
    assert data.listing_fingerprint(str(tmp_path)) != before


def test_duplicate_images_are_left_out_once_named_and_counted(tmp_path, caplog):
    import logging
    import shutil
    write_images(tmp_path, [(64, 64), (64, 64)])
    shutil.copy(tmp_path / "img0.png", tmp_path / "copy_of_img0.png")
    (tmp_path / "copy_of_img0.txt").write_text("another caption")
    with caplog.at_level(logging.WARNING):
        ds = data.scan_dataset(str(tmp_path), config(resolution=64, min_side=64))
    assert len(ds.items) == 2 and [(a.split("/")[-1], b.split("/")[-1]) for a, b in ds.duplicates] == [
        ("img0.png", "copy_of_img0.png")]
    assert "1 duplicate image(s)" in caplog.text and "'img0.png' is identical to 'copy_of_img0.png'" in caplog.text


# -------------------------------------------------------------------------------------------- caption variants
def test_caption_variants_are_distinct_orders_of_the_tags_that_keep_the_first_n_in_place():
    caption = "ohwx, red hat, smiling, outdoors, photo"
    variants = data.caption_variants(caption, keep_tokens=2, count=6)
    assert len(variants) == 6 and len(set(variants)) == 6
    assert variants[0] == caption, "the caption's own order is one of them"
    for v in variants:
        tags = v.split(", ")
        assert tags[:2] == ["ohwx", "red hat"] and sorted(tags[2:]) == ["outdoors", "photo", "smiling"]
    assert data.caption_variants(caption, 2, 6) == variants, "the same caption gives the same variants"


def test_the_number_of_caption_variants_is_bounded_by_the_setting_and_by_the_distinct_orders():
    assert len(data.caption_variants("a, b, c", 0, 8)) == 6          # 3! orders
    assert len(data.caption_variants("a, b, c", 1, 8)) == 2          # b, c / c, b
    assert set(data.caption_variants("a, a, b", 0, 8)) == {"a, a, b", "a, b, a", "b, a, a"}   # 3!/2! orders
    assert data.caption_variants("one tag", 0, 8) == ("one tag",)
    assert data.caption_variants("a, b, c", 5, 8) == ("a, b, c",)    # every tag kept in place
    assert len(data.caption_variants(", ".join(map(str, range(30))), 0, 8)) == 8
    with pytest.raises(ConfigError, match="caption_variants must be between 1 and 8"):
        DatasetConfig(folder="x", caption_variants=9)


def test_shuffle_captions_gives_each_item_its_variants_and_the_dataset_lists_every_one_to_cache(tmp_path):
    write_images(tmp_path, [(64, 64), (64, 64)])
    (tmp_path / "img0.txt").write_text("red, round, small")
    (tmp_path / "img1.txt").write_text("blue")
    config = DatasetConfig(folder="x", resolution=64, min_side=64, max_side=128, trigger_word="ohwx",
                           shuffle_captions=True, keep_tokens=1, caption_variants=8, caption_dropout=0.2)
    dataset = data.scan_dataset(str(tmp_path), config)
    red, blue = sorted(dataset.items, key=lambda i: i.path)
    assert len(red.caption_variants) == 6 and all(v.startswith("ohwx, ") for v in red.caption_variants)
    assert blue.caption_variants == ("ohwx, blue",)
    assert red.caption_dropout == blue.caption_dropout == 0.2
    assert set(dataset.captions) == set(red.caption_variants) | {"ohwx, blue"}
    plain = data.scan_dataset(str(tmp_path), DatasetConfig(folder="x", resolution=64, min_side=64, max_side=128))
    assert all(not i.caption_variants for i in plain.items)
