"""scripts/queue_workflow.py against the live server, run as a user runs it (a subprocess)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_images
from workflow_format import api_to_ui, tiny_training_prompt

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "queue_workflow.py"


def queue(server, workflow_file, *args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), str(workflow_file), "--server", server.url, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_queue_workflow_trains_prints_steps_and_downloads_samples_and_loss_graph(server, tmp_path):
    write_images(server.base / "input" / "qw_images", [(64, 64)] * 3)
    api = json.loads((ROOT / "example_workflows" / "api" / "sdxl_lora.json").read_text())
    workflow = tmp_path / "train_api.json"
    workflow.write_text(json.dumps(tiny_training_prompt(api, "qw_images", steps=4, prefix="ci/qw")))
    out = tmp_path / "results"
    done = queue(server, workflow, "--out", str(out), "--set", "7.steps=6", "--set", "10.every_n_steps=3",
                 "--set", "8.filename_prefix=ci/qw_set")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(re.fullmatch(r"\[node 7 EriTrainSteps\] step 6/6  loss \d+\.\d{5}  lr \S+  \d+\.\d\d it/s  ETA \S+",
                            line) for line in lines), done.stdout
    assert "[node 7 EriTrainSteps] running" in lines
    assert any(line.startswith("adapter saved by node 8: ci/qw_set_000006.safetensors (step 6") for line in lines)
    assert (server.base / "models" / "loras" / "ci" / "qw_set_000006.safetensors").is_file()
    samples = sorted(p.name for p in (out / "eri_samples").glob("*.png"))
    assert [s[:len("sdxl_lora_step000003_seed42_p0")] for s in samples] == [
        "sdxl_lora_step000003_seed42_p0", "sdxl_lora_step000003_seed42_p1",
        "sdxl_lora_step000006_seed42_p0", "sdxl_lora_step000006_seed42_p1"]
    for name in samples:
        assert (out / "eri_samples" / name).read_bytes() == \
            (server.base / "output" / "eri_samples" / name).read_bytes()
    graphs = [line for line in lines if line.startswith("image from node 9 (EriLossGraph): ")]
    assert len(graphs) == 1 and Path(graphs[0].split(": ", 1)[1]).stat().st_size > 1000


def test_queue_workflow_reports_a_refused_workflow_and_rejects_a_ui_workflow(server, client, tmp_path):
    bad = tmp_path / "bad_api.json"
    bad.write_text(json.dumps({"1": {"class_type": "EriSaveAdapter", "inputs": {"filename_prefix": "ci/never",
                                                                             "save_dtype": "fp16"}}}))
    refused = queue(server, bad)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert re.search(r"node 1 \(EriSaveAdapter\): Required input is missing: adapter", refused.stderr), refused.stderr

    ui = tmp_path / "ui.json"
    api = json.loads((ROOT / "example_workflows" / "api" / "sdxl_lora.json").read_text())
    ui.write_text(json.dumps(api_to_ui(api, client.get_json("/object_info"))))
    rejected = queue(server, ui)
    assert rejected.returncode != 0 and "Export (API)" in rejected.stderr
