"""The fixtures are real: a ComfyUI 0.3.75 server with this pack loaded, driven over HTTP and websocket."""
import shutil

import pytest

pytestmark = pytest.mark.server


def test_server_lists_the_packs_nodes_with_tooltips_and_defaults(client):
    info = client.get_json("/object_info")
    ours = {name: node for name, node in info.items() if name.startswith("Eri") and not name.startswith("EriTest")}
    assert {"EriTrainingImages", "EriCacheLatents", "EriCacheCaptions", "EriCreateAdapter", "EriTrainingSettings",
            "EriTrainSteps", "EriSaveAdapter", "EriLoadAdapter", "EriLossGraph"} <= set(ours)
    for name, node in ours.items():
        assert node["category"].startswith("EriDiffusion"), name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
                if spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or isinstance(spec[0], list):
                    assert "default" in options or spec[0] == "COMBO", f"{name}.{input_name} has no default"


def test_a_workflow_of_stock_nodes_runs_on_a_tiny_model_and_writes_an_image(client, server):
    prompt = {
        "1": {"class_type": "EriTestTinyModel", "inputs": {"arch": "sdxl", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red square"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "fixture_check"}},
    }
    result = client.run(prompt, timeout=300)
    assert result.ok, result.error or server.log_tail()
    images = result.outputs("7")["images"]
    assert images and images[0]["filename"].startswith("fixture_check")
    assert (server.base / "output" / images[0]["filename"]).stat().st_size > 0


def test_the_frontend_page_is_served(client):
    page = client.get_text("/")
    assert "<html" in page.lower() and "comfy" in page.lower()


def test_the_packs_web_extension_is_served(client):
    extensions = client.get_json("/extensions")
    ours = [e for e in extensions if e.endswith("train_progress.js")]
    assert ours, extensions
    assert "eridiffusion.step" in client.get_text(ours[0])
