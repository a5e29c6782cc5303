"""The dataset nodes as ComfyUI runs them, with folders an attacker (or an accident) prepared: links out of
ComfyUI's input folder, images and captions sized to exhaust memory or time, and Cancel pressed while
caching. Each is refused with an error naming the file and what to change, or stops promptly."""
import struct
import zlib

import comfy.model_management
import pytest
import torch

from conftest import write_images
from helpers import run
from eridiffusion.trainers.config import ConfigError

SECRET = "TOP-SECRET-7f3a the server's private file"
DATASET = dict(folder="set", resolution=64, trigger_word="", default_caption="", flip=False, min_side=64,
               max_side=128, max_upscale=1.0)


def training_images(**overrides):
    from eridiffusion.nodes.dataset import EriTrainingImages
    return run(EriTrainingImages, **{**DATASET, **overrides})[0]


@pytest.fixture
def folders(comfy_folders, monkeypatch):
    """ComfyUI's folders, a private file outside them, ERI_ALLOW_ANY_PATH unset, Cancel not pressed."""
    monkeypatch.delenv("ERI_ALLOW_ANY_PATH", raising=False)
    (comfy_folders["output"].parent / "secret.txt").write_text(SECRET)
    comfy.model_management.interrupt_current_processing(False)
    yield comfy_folders
    comfy.model_management.interrupt_current_processing(False)


def test_a_caption_linking_out_of_the_input_folder_is_refused_and_its_text_never_shown(folders):
    write_images(folders["input"] / "set", [(64, 64)], captions=False)
    (folders["input"] / "set" / "img0.txt").symlink_to(folders["output"].parent / "secret.txt")
    with pytest.raises(ConfigError) as refused:
        training_images()
    message = str(refused.value)
    assert "caption file 'img0.txt' in folder 'set' is a link to a file outside the folder" in message
    assert "ERI_ALLOW_ANY_PATH=1" in message and "TOP-SECRET" not in message


def test_an_image_linking_out_of_the_input_folder_is_refused(folders):
    write_images(folders["output"] / "private", [(64, 64)])
    write_images(folders["input"] / "set", [(64, 64)], seed=3, prefix="own")
    (folders["input"] / "set" / "img0.png").symlink_to(folders["output"] / "private" / "img0.png")
    (folders["input"] / "set" / "img0.txt").write_text("a caption")
    with pytest.raises(ConfigError, match=r"image 'img0.png' in folder 'set' is a link to a file outside the folder"):
        training_images()


def test_links_out_are_followed_on_a_machine_that_allows_any_path(folders, monkeypatch):
    write_images(folders["input"] / "set", [(64, 64)], captions=False)
    (folders["input"] / "set" / "img0.txt").symlink_to(folders["output"].parent / "secret.txt")
    monkeypatch.setenv("ERI_ALLOW_ANY_PATH", "1")
    assert training_images().captions == (SECRET,)


def test_a_thin_strip_image_is_refused_before_it_is_decoded(folders):
    # 8x200000 (3.5 KB as a PNG) was resized to a 6.9 GB image before the crop.
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    write_images(folders["input"] / "set", [(64, 64)])
    (folders["input"] / "set" / "strip.png").write_bytes(   # a header and no pixels: decoding it would fail
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 200_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", b""))
    with pytest.raises(ConfigError, match=r"image 'strip.png' in folder 'set' is 8x200000 pixels, 25000.0:1, more "
                                          r"elongated than the 4:1 this dataset allows.*: crop it"):
        training_images(default_caption="x")


def test_a_caption_of_megabytes_is_refused_naming_the_file_and_the_cap(folders):
    write_images(folders["input"] / "set", [(64, 64)])
    (folders["input"] / "set" / "img0.txt").write_text("tag, " * 2_000_000)
    with pytest.raises(ConfigError, match=r"caption file 'img0.txt' in folder 'set' is 10,000,000 bytes, longer than "
                                          r"a caption may be \(8,192 characters.*shorten it"):
        training_images()


def test_a_very_long_trigger_word_is_refused_naming_the_input(folders):
    write_images(folders["input"] / "set", [(64, 64)])
    with pytest.raises(ConfigError, match=r"trigger_word is 100,000 characters, more than the 8,192"):
        training_images(trigger_word="w" * 100_000)


# -------------------------------------------------------------------------------------------------- Cancel
def interrupt_during_call(obj, method: str, monkeypatch, on_call: int) -> list:
    """Counts calls of obj.method and presses Cancel (ComfyUI's interrupt flag) during call number on_call."""
    calls = []
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            comfy.model_management.interrupt_current_processing(True)
        return original(*args, **kwargs)
    monkeypatch.setattr(obj, method, counted)
    return calls


def test_cancel_stops_cache_captions_after_the_caption_being_encoded(folders, tiny, monkeypatch):
    # A 10 MB caption kept Cache captions busy for 14 minutes and Cancel took 7 minutes; now each caption is
    # short and Cancel is checked after each one.
    from eridiffusion.nodes.dataset import EriCacheCaptions
    write_images(folders["input"] / "set", [(64, 64)] * 12)
    dataset = training_images()
    assert len(dataset.captions) == 12
    with torch.inference_mode(False):
        clip = tiny.tiny_clip("sdxl")
    encodes = interrupt_during_call(clip, "encode_from_tokens", monkeypatch, on_call=3)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(EriCacheCaptions, dataset=dataset, clip=clip)
    assert len(encodes) == 3
    assert not comfy.model_management.processing_interrupted()     # the flag is consumed, as ComfyUI expects


def test_cancel_stops_cache_latents_after_the_batch_being_encoded(folders, tiny, monkeypatch):
    from eridiffusion.nodes.dataset import EriCacheLatents
    write_images(folders["input"] / "set", [(64, 64)] * 8)
    dataset = training_images()
    with torch.inference_mode(False):
        vae = tiny.tiny_vae("sdxl")
    encodes = interrupt_during_call(vae, "encode", monkeypatch, on_call=2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(EriCacheLatents, dataset=dataset, vae=vae, batch_size=1)
    assert len(encodes) == 2


def test_cancel_while_a_batch_of_images_is_read_stops_before_encoding_it(folders, tiny, monkeypatch):
    from eridiffusion.nodes.dataset import EriCacheLatents
    from eridiffusion.trainers import cache
    write_images(folders["input"] / "set", [(64, 64)] * 8)
    dataset = training_images()
    with torch.inference_mode(False):
        vae = tiny.tiny_vae("sdxl")
    interrupt_during_call(cache, "load_image", monkeypatch, on_call=2)
    encodes = interrupt_during_call(vae, "encode", monkeypatch, on_call=0)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(EriCacheLatents, dataset=dataset, vae=vae, batch_size=8)
    assert encodes == []


def test_cancel_pressed_before_caching_encodes_nothing(folders, tiny, monkeypatch):
    from eridiffusion.nodes.dataset import EriCacheCaptions
    write_images(folders["input"] / "set", [(64, 64)] * 2)
    dataset = training_images()
    with torch.inference_mode(False):
        clip = tiny.tiny_clip("sdxl")
    encodes = interrupt_during_call(clip, "encode_from_tokens", monkeypatch, on_call=0)
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(EriCacheCaptions, dataset=dataset, clip=clip)
    assert encodes == []


def test_cancel_stops_a_folder_scan_between_files(folders, monkeypatch):
    from eridiffusion.trainers import data
    write_images(folders["input"] / "set", [(64, 64)] * 6)
    measured = interrupt_during_call(data, "_measure_image", monkeypatch, on_call=2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        training_images()
    assert len(measured) == 2
