"""The example workflows, as a user queues them: loadable by the frontend, runnable through /prompt."""
import json
import threading
from pathlib import Path

import pytest

from conftest import write_images
from workflow_format import api_to_ui, tiny_training_prompt, ui_to_api

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


@pytest.mark.parametrize("name", [p.stem for p in sorted((EXAMPLES / "api").glob("*.json"))])
def test_example_workflow_uses_registered_nodes_and_its_ui_form_matches_its_api_form(client, name):
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    assert {n["type"] for n in ui["nodes"]} <= set(info)
    assert ui == api_to_ui(api, info), "regenerate with scripts/export_workflows.py"
    assert ui_to_api(ui, info) == api


def test_sdxl_example_workflow_trains_and_writes_a_lora_on_the_live_server(client, server):
    write_images(server.base / "input" / "wf_images", [(64, 64), (64, 96), (96, 64), (64, 64)])
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    prompt = tiny_training_prompt(api, "wf_images", steps=12, prefix="ci/sdxl")
    result = client.run(prompt, timeout=600)
    assert result.ok, result.error or server.log_tail()
    lora = server.base / "models" / "loras" / "ci" / "sdxl_000012.safetensors"
    assert lora.is_file() and lora.with_name("sdxl_000012.eri-state").is_file()
    steps = [e for e in result.events_of("eridiffusion.step") if e["node"] == "7"]
    assert [e["step"] for e in steps] == list(range(1, 13)) and all(e["total"] == 12 for e in steps)
    assert all(e["loss"] > 0 and e["eta_s"] is not None for e in steps)
    progress = [e for e in result.events_of("progress") if e.get("node") == "7"]
    assert progress and progress[-1]["value"] == 12 and progress[-1]["max"] == 12
    assert result.outputs("9")["images"], "the loss graph is shown in the canvas"
    assert "saved ci/sdxl_000012.safetensors" in json.dumps(result.outputs("8"))


def test_cancel_stops_training_within_a_step_and_the_server_keeps_serving(client, server):
    write_images(server.base / "input" / "cancel_images", [(64, 64)] * 2)
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    prompt = tiny_training_prompt(api, "cancel_images", steps=100000, prefix="ci/cancelled")
    seen = []

    def on_event(event):
        if event["type"] == "eridiffusion.step":
            seen.append(event["data"]["step"])
            if len(seen) == 3:
                threading.Thread(target=client.post_json, args=("/interrupt", {})).start()

    result = client.run(prompt, timeout=300, on_event=on_event)
    assert any(e["type"] == "execution_interrupted" for e in result.events)
    assert 3 <= len(seen) <= 5, seen
    again = client.run({"1": {"class_type": "EriTestTinyModel", "inputs": {"arch": "sdxl", "seed": 1}},
                        "2": {"class_type": "EriCreateAdapter", "inputs": {
                            "model": ["1", 0], "adapter_type": "lora", "rank": 2, "alpha": 2.0,
                            "target": "attention", "seed": 0, "dtype": "fp32"}},
                        "3": {"class_type": "EriSaveAdapter", "inputs": {"adapter": ["2", 0],
                                                                        "filename_prefix": "ci/after_cancel",
                                                                        "save_dtype": "fp16"}}}, timeout=120)
    assert again.ok, again.error
