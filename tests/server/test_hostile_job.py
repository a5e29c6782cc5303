"""A hostile YAML job sent to a live ComfyUI server through its HTTP API: refused at Queue (POST /prompt answers
400 with the node's error) in a message of a few hundred characters, with nothing stored in /history and little
logged, and the server goes on serving."""
import json
import time

import pytest

from conftest import write_images

pytestmark = pytest.mark.server

GOOD_JOB = """\
job: extension
config:
  name: hostile_job_ok
  process:
    - type: sd_trainer
      network: {type: lora, linear: 2, linear_alpha: 2}
      datasets: [{folder_path: hostile_job_images, caption_ext: txt, resolution: 64}]
      train: {steps: 1, lr: 1e-4}
"""
SMALL = 10_000      # bytes: what a refusal may add to the answer, /history and the server's log


def laughs(levels: int) -> str:
    """Billion laughs: anchor l<i> is a list of nine l<i-1>, so l9 stands for 9**9 (387 million) strings."""
    return "\n".join(['  l0: &l0 "lol"'] + [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
                                              for i in range(1, levels + 1)])


def laughing_job(levels: int, old: str, new: str) -> str:
    return "meta:\n" + laughs(levels) + "\n" + GOOD_JOB.replace(old, new)


def job_prompt(job: str) -> dict:
    """Tiny model -> Load training job -> Save adapter (an output node, so the job node is validated)."""
    return {
        "1": {"class_type": "EriTestTinyModel", "inputs": {"arch": "sdxl", "seed": 0}},
        "2": {"class_type": "EriLoadTrainingJob", "inputs": {"model": ["1", 0], "job": job}},
        "3": {"class_type": "EriSaveAdapter", "inputs": {"adapter": ["2", 1], "filename_prefix": ["2", 4],
                                                         "save_dtype": "fp16"}},
    }


@pytest.mark.parametrize("levels, old, new", [
    (9, "steps: 1,", "steps: *l9,"),                       # the reported 640-byte job (a 312 MB message)
    (9, "train: {", "train: {xformers: *l9, "),           # inside a key EriDiffusion ignores
    (10, "steps: 1,", "steps: *l10,"),                     # one level more killed the server
], ids=["train.steps", "ignored_key", "one_level_more"])
def test_a_billion_laughs_job_is_refused_at_queue_in_a_short_message(client, server, levels, old, new):
    write_images(server.base / "input" / "hostile_job_images", [(64, 64)])
    job = laughing_job(levels, old, new)
    assert new in job and len(job) < 1100
    history_before = len(client.get_text("/history"))
    log_before = len(server.log())

    start = time.perf_counter()
    status, answer = client.queue(job_prompt(job))
    assert time.perf_counter() - start < 20
    assert status == 400, answer
    details = " ".join(e["details"] for e in answer["node_errors"]["2"]["errors"])
    assert "aliases expand to more than 20,000 values (line" in details, details
    assert len(json.dumps(answer)) < SMALL

    assert client.get_json("/object_info/EriLoadTrainingJob"), "the server keeps answering"
    assert len(client.get_text("/history")) - history_before < SMALL
    time.sleep(0.5)     # the refusal's log lines are flushed
    assert len(server.log()) - log_before < SMALL


def test_a_billion_laughs_job_file_in_the_input_folder_is_refused_at_queue(client, server):
    (server.base / "input" / "jobs").mkdir(exist_ok=True)
    (server.base / "input" / "jobs" / "laughs.yaml").write_text(laughing_job(9, "steps: 1,", "steps: *l9,"))
    status, answer = client.queue(job_prompt("jobs/laughs.yaml"))
    assert status == 400, answer
    details = " ".join(e["details"] for e in answer["node_errors"]["2"]["errors"])
    assert "aliases expand to more than 20,000 values" in details and len(json.dumps(answer)) < SMALL


@pytest.mark.parametrize("old, new, words", [
    ("steps: 1, lr", f"steps: 1, seed: {2**70}, lr", ["config.process[0].train.seed must be between 0 and 4294967295"]),
    ("name: hostile_job_ok", "name: \"a\\0b\"", ["config.name must not contain control"]),
    ("name: hostile_job_ok", "name: " + "n" * 10_000, ["config.name is 10,000 bytes long"]),
    ("folder_path: hostile_job_images", "folder_path: ../..", ["folder_path", "points outside"]),
    ("folder_path: hostile_job_images", "folder_path: no_such_images", ["no_such_images' does not exist"]),
])
def test_a_job_that_would_fail_later_is_refused_at_queue_naming_the_key(client, server, old, new, words):
    write_images(server.base / "input" / "hostile_job_images", [(64, 64)])
    job = GOOD_JOB.replace(old, new)
    assert new in job
    status, answer = client.queue(job_prompt(job))
    assert status == 400, answer
    details = " ".join(e["details"] for e in answer["node_errors"]["2"]["errors"])
    assert all(w in details for w in words), details
    assert len(json.dumps(answer)) < SMALL


def test_after_the_refusals_a_good_job_in_the_same_prompt_runs(client, server):
    write_images(server.base / "input" / "hostile_job_images", [(64, 64)])
    result = client.run(job_prompt(GOOD_JOB), timeout=300)
    assert result.ok, result.error or server.log_tail()
    assert (server.base / "models" / "loras" / "hostile_job_ok" / "hostile_job_ok_000000.safetensors").is_file()
