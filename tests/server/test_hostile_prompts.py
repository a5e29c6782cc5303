"""Prompts as an attacker (or a slip of the keyboard) sends them to ComfyUI's HTTP API: refused at Queue with
a message naming the input, before a model loads or a step trains, and nothing read from outside the
allowed folders ever comes back."""
import json
import math
from pathlib import Path

import pytest

from conftest import write_images
from workflow_format import tiny_training_prompt

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


def node_error_text(answer: dict, node_id: str) -> str:
    return " ".join(f"{e.get('message')}: {e.get('details')}" for e in answer["node_errors"][node_id]["errors"])


def sdxl_prompt(server, folder="hostile_images", steps=2):
    write_images(server.base / "input" / folder, [(64, 64)] * 2)
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    return tiny_training_prompt(api, folder, steps=steps, prefix="ci/hostile")


@pytest.mark.parametrize("node,name,value", [
    ("6", "max_grad_norm", math.nan), ("6", "weight_decay", math.nan), ("6", "learning_rate", math.inf),
    ("6", "noise_offset", math.nan), ("5", "alpha", math.nan), ("2", "max_upscale", math.nan),
    ("10", "cfg", math.nan), ("6", "learning_rate", 5.0), ("6", "ema_decay", math.nan), ("2", "caption_dropout", math.nan),
])
def test_a_number_that_is_not_finite_or_out_of_range_is_refused_at_queue_naming_the_input(client, server, node,
                                                                                          name, value):
    prompt = sdxl_prompt(server)
    prompt[node]["inputs"][name] = value
    status, answer = client.queue(prompt)
    assert status == 400, answer
    text = node_error_text(answer, node)
    assert name in text and ("finite number" in text if not math.isfinite(value) else "at most 1.0" in text), text


def test_save_and_sample_prefixes_that_leave_their_folders_are_refused_at_queue(client, server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = server.base / "output" / "link_out"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    for node, name, prefix, expected in [
        ("8", "filename_prefix", "../../escape", "points outside"),
        ("7", "save_prefix", "../escape/run", "points outside"),
        ("10", "filename_prefix", "link_out/sample", "points outside"),     # a link inside output/ leads out
        ("8", "filename_prefix", "x" * 300, "file name"),
        ("10", "filename_prefix", "x" * 240, "file name"),
        ("8", "filename_prefix", "ok/na\x00me", "control character"),
    ]:
        prompt = sdxl_prompt(server)
        # ComfyUI queues a prompt whose other outputs are valid: the loss graph would train on its own
        del prompt["9"]
        prompt[node]["inputs"][name] = prefix
        status, answer = client.queue(prompt)
        assert status == 400, (node, name, answer)
        text = node_error_text(answer, node)
        assert name in text and expected in text, text
        assert len(text) < 2000, "the prefix is quoted only in part"
    assert list(outside.iterdir()) == []


def test_a_missing_training_folder_is_refused_at_queue(client, server):
    prompt = sdxl_prompt(server)
    prompt["2"]["inputs"]["folder"] = "no_such_folder"
    status, answer = client.queue(prompt)
    assert status == 400
    assert "folder 'no_such_folder' does not exist in ComfyUI's input folder" in node_error_text(answer, "2")


def test_a_training_folder_without_images_is_refused_at_queue_saying_where_to_put_them(client, server):
    empty = server.base / "input" / "no_images_yet"
    empty.mkdir(exist_ok=True)
    (empty / "notes.md").write_text("to do: add photos")
    prompt = sdxl_prompt(server)
    prompt["2"]["inputs"]["folder"] = "no_images_yet"
    status, answer = client.queue(prompt)
    assert status == 400
    text = node_error_text(answer, "2")
    assert "folder 'no_images_yet' has no images (.png, .jpg" in text and str(empty) in text, text


def test_a_caption_extension_that_climbs_out_of_the_dataset_reads_nothing(client, server):
    # The attack: a folder named "<image stem>." (which /upload/image creates with subfolder=trav/a.) makes
    # "<stem>" + "./../../../secret.txt" a path that resolves; the caption text came back in the error.
    secret = server.base / "secret.txt"
    secret.write_text("TOP-SECRET-7f3a the server's private file")
    write_images(server.base / "input" / "trav", [(64, 64)], prefix="a")
    (server.base / "input" / "trav" / "a.").mkdir(exist_ok=True)
    job = ("job: extension\nconfig:\n  name: trav\n  process:\n    - type: sd_trainer\n"
           "      network: {type: lora}\n"
           "      datasets: [{folder_path: trav, caption_ext: './../../../secret.txt', resolution: 64}]\n"
           "      train: {steps: 1, lr: 0.01}\n")
    prompt = {
        "1": {"class_type": "EriTestTinyModel", "inputs": {"arch": "sdxl", "seed": 0}},
        "2": {"class_type": "EriLoadTrainingJob", "inputs": {"model": ["1", 0], "job": job}},
        "3": {"class_type": "EriCacheCaptions", "inputs": {"dataset": ["2", 0], "clip": ["1", 1]}},
        "4": {"class_type": "EriCacheLatents", "inputs": {"dataset": ["2", 0], "vae": ["1", 2], "batch_size": 1}},
        "5": {"class_type": "EriTrainSteps", "inputs": {
            "model": ["1", 0], "adapter": ["2", 1], "latents": ["4", 0], "captions": ["3", 0], "settings": ["2", 2],
            "steps": ["2", 3]}},
        "6": {"class_type": "EriSaveAdapter", "inputs": {"adapter": ["5", 1], "filename_prefix": ["2", 4],
                                                         "save_dtype": "fp16"}},
    }
    status, answer = client.queue(prompt)
    assert status == 400, answer
    assert "caption_ext" in node_error_text(answer, "2")
    assert "TOP-SECRET" not in json.dumps(answer)
    assert "TOP-SECRET" not in json.dumps(client.get_json("/history"))
    assert "TOP-SECRET" not in server.log()


def test_a_bad_control_folder_is_refused_at_queue_naming_it_and_the_images_without_a_control(client, server):
    prompt = sdxl_prompt(server, folder="kontext_after")
    write_images(server.base / "input" / "kontext_before", [(64, 64)], captions=False, seed=4)   # img1 lacks one
    for control_folder, expected in [
        ("kontext_before", "control_folder 'kontext_before' has no control image for 1 training image(s) of folder "
                           "'kontext_after': 'img1.png'"),
        ("no_such_folder", "control_folder 'no_such_folder' does not exist in ComfyUI's input folder"),
        ("../../etc", "control_folder '../../etc' points outside"),
        ("kontext_after", "is the training folder itself"),
    ]:
        prompt["2"]["inputs"]["control_folder"] = control_folder
        status, answer = client.queue(prompt)
        assert status == 400, (control_folder, answer)
        assert expected in node_error_text(answer, "2"), node_error_text(answer, "2")
