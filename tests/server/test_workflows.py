"""The example workflows, as a user queues them: loadable by the frontend, runnable through /prompt."""
import io
import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from live_server import PACK_LINK_NAME
from workflow_format import VIRTUAL_NODES, example_ui, tiny_training_prompt, ui_to_api

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
# What the template browser shows of each example, in the format of the frontend's own templates index.
TEMPLATES_INDEX = ROOT / "web" / "templates.json"


@pytest.mark.parametrize("name", [p.stem for p in sorted((EXAMPLES / "api").glob("*.json"))])
def test_example_workflow_uses_registered_nodes_and_its_ui_form_matches_its_api_form(client, name):
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    assert {n["type"] for n in ui["nodes"]} - VIRTUAL_NODES <= set(info)
    assert _graph(ui) == _graph(example_ui(name, api, info)), "regenerate with scripts/export_workflows.py"
    assert ui_to_api(ui, info) == api


def test_the_server_lists_each_example_with_a_small_thumbnail_and_the_pack_gives_each_a_title_and_a_description(
        client):
    """What the template browser reads for a pack: ComfyUI's list of its example workflows by file name and
    <name>.jpg served beside each; the pack's web/js/templates.js adds each one's title and description from
    web/templates.json, and locales/en/main.json names the pack's category (by the folder ComfyUI loaded it from:
    the registry's and the repository's name)."""
    examples = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    assert sorted(client.get_json("/workflow_templates")[PACK_LINK_NAME]) == examples
    for name in examples:
        with urllib.request.urlopen(f"{client.url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            data = r.read()
        assert len(data) < 60_000, f"{name}.jpg: {len(data)} bytes; regenerate with scripts/export_thumbnails.py"
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.size) == ("JPEG", (512, 512)), "the browser's cards are square"

    index = json.loads(TEMPLATES_INDEX.read_text())
    assert client.get_json(f"/extensions/{PACK_LINK_NAME}/templates.json") == index
    assert sorted(t["name"] for t in index["templates"]) == examples, "one entry per example, each once"
    for template in index["templates"]:
        title, description = template["title"], template["description"]
        assert title and title != template["name"]
        assert description.endswith(".") and ". " not in description, f"{title}: one sentence"
        # The frontend shows "-" and "_" in a description as spaces.
        assert "-" not in description and "_" not in description, description
        assert (template["mediaType"], template["mediaSubtype"]) == ("image", "jpg")
    assert client.get_json("/i18n")["en"]["templateWorkflows"]["category"][PACK_LINK_NAME] == index["title"]


def _graph(ui: dict) -> dict:
    """A UI workflow without what the frontend derives from the server's node definitions, which change between
    ComfyUI versions (0.33's SaveImage gained an IMAGE output): node sizes and outputs nothing is linked to."""
    return {**ui, "nodes": [{**{k: v for k, v in node.items() if k != "size"},
                             "outputs": [o for o in node["outputs"] if o["links"]]} for node in ui["nodes"]]}


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

    # samples every 6 steps (two prompts), saved under output/ as sampled, and shown on the node while it
    # trains, each captioned with its step and prompt (a copy in temp/), then kept in its output
    saved = result.outputs("7")["eri_samples"]
    assert [(s["subfolder"], s["filename"][:len("sdxl_lora_step000006_seed42_p0")]) for s in saved] == [
        ("eri_samples", "sdxl_lora_step000006_seed42_p0"), ("eri_samples", "sdxl_lora_step000006_seed42_p1"),
        ("eri_samples", "sdxl_lora_step000012_seed42_p0"), ("eri_samples", "sdxl_lora_step000012_seed42_p1")]
    samples = result.outputs("7")["images"]
    assert [(s["type"], s["filename"][:len("eri_preview_step000006_p0")]) for s in samples] == [
        ("temp", "eri_preview_step000006_p0"), ("temp", "eri_preview_step000006_p1"),
        ("temp", "eri_preview_step000012_p0"), ("temp", "eri_preview_step000012_p1")]
    for shown, output in zip(samples, saved):
        with Image.open(server.base / "temp" / shown["subfolder"] / shown["filename"]) as captioned, \
                Image.open(server.base / "output" / output["subfolder"] / output["filename"]) as plain:
            assert captioned.width == plain.width and captioned.height > plain.height, "a caption strip below"
            assert np.array_equal(np.asarray(captioned.convert("RGB"))[:plain.height], np.asarray(plain.convert("RGB")))
    kinds = [(e["type"], e["data"].get("step")) for e in result.events
             if e["type"] in ("eridiffusion.step", "executed") and e["data"].get("node") == "7"]
    preview = kinds.index(("executed", None))
    assert kinds[preview - 1] == ("eridiffusion.step", 6) and kinds[preview + 1] == ("eridiffusion.step", 7), \
        "the step-6 samples are shown while training goes on"

    # the chart's history survives a page reload: the server keeps it per node
    history = client.get_json("/eridiffusion/history/7")
    assert history["steps"] == list(range(1, 13)) and history["running"] is False
    assert history["losses"] == [e["loss"] for e in steps] and history["prompt_id"] == result.prompt_id
    assert history["images"] == samples, "a reloaded page shows the same captioned samples"


@pytest.mark.parametrize("name,arch", [("sd35_lora", "sd3"), ("flux_lora", "flux"), ("chroma_lora", "chroma"),
                                       ("qwen_image_lora", "qwen_image"), ("zimage_lora", "zimage"),
                                       ("flux2_lora", "flux2")])
def test_sd35_flux_chroma_qwen_image_zimage_and_flux2_example_workflows_train_sample_and_save_on_the_live_server(
        client, server, name, arch):
    write_images(server.base / "input" / f"{name}_images", [(64, 64), (64, 128), (64, 64)])
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    prompt = tiny_training_prompt(api, f"{name}_images", steps=6, prefix=f"ci/{name}")
    assert {n["class_type"] for n in prompt.values()} & {"UNETLoader", "CLIPLoader", "DualCLIPLoader",
                                                          "TripleCLIPLoader", "VAELoader",
                                                          "CheckpointLoaderSimple"} == set()
    assert any(n["inputs"].get("arch") == arch for n in prompt.values())
    result = client.run(prompt, timeout=600)
    assert result.ok, result.error or server.log_tail()
    lora = server.base / "models" / "loras" / "ci" / f"{name}_000006.safetensors"
    assert lora.is_file() and lora.with_name(f"{name}_000006.eri-state").is_file()
    from safetensors import safe_open
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["eri.architecture"] == arch
    steps = [e for e in result.events_of("eridiffusion.step") if e["node"] == "7"]
    assert [e["step"] for e in steps] == list(range(1, 7)) and all(e["loss"] > 0 for e in steps)
    assert len(result.outputs("7")["images"]) == 4, "two prompts sampled at steps 3 and 6"


@pytest.mark.parametrize("arch", ["sdxl", "sd35", "flux"])
def test_train_then_stock_ksampler_then_train_again_example_runs_on_the_live_server(client, server, arch):
    write_images(server.base / "input" / "tst_images", [(64, 64)] * 3)
    api = json.loads((EXAMPLES / "api" / f"{arch}_train_sample_train.json").read_text())
    prompt = tiny_training_prompt(api, "tst_images", steps=4, prefix=f"ci/tst_{arch}")
    result = client.run(prompt, timeout=600)
    assert result.ok, result.error or server.log_tail()
    image = result.outputs("13")["images"][0]
    assert (server.base / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
    steps = [(e["node"], e["step"]) for e in result.events_of("eridiffusion.step")]
    assert steps == [("7", s) for s in range(1, 5)] + [("14", s) for s in range(5, 9)], "stage 2 continues"
    assert (server.base / "models" / "loras" / "ci" / f"tst_{arch}_000008.safetensors").is_file()
    assert client.get_json("/eridiffusion/history/14")["steps"][:4] == [1, 2, 3, 4], \
        "the second stage's chart starts with the first stage's steps"


# name, the tiny architecture, the LoadImage node, the nodes given its image as it is (and their input), the
# SaveImage node
EDIT_EXAMPLES = [("flux_kontext_lora", "flux", "13", (("15", "pixels"),), "22"),
                 ("qwen_image_edit_lora", "qwen_image", "14", (("16", "pixels"), ("17", "image"), ("18", "image")),
                  "21")]


@pytest.mark.parametrize("name,arch,load,unscaled,save", EDIT_EXAMPLES, ids=[e[0] for e in EDIT_EXAMPLES])
def test_edit_examples_train_on_edit_pairs_then_edit_an_image_in_the_stock_ksampler(client, server, name, arch, load,
                                                                                    unscaled, save):
    """Flux Kontext (ReferenceLatent) and Qwen-Image-Edit (TextEncodeQwenImageEdit, which also shows the image to
    the text encoder)."""
    write_images(server.base / "input" / f"{name}_after", [(64, 64)] * 3)
    write_images(server.base / "input" / "training_images_before", [(64, 64)] * 3, captions=False, seed=7)
    write_images(server.base / "input", [(64, 64)], captions=False, seed=9, prefix=f"{name}_example_")
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    prompt = tiny_training_prompt(api, f"{name}_after", steps=4, prefix=f"ci/{name}")
    assert prompt["2"]["inputs"]["control_folder"] == "training_images_before"
    assert any(n["inputs"].get("arch") == arch for n in prompt.values())
    prompt[load]["inputs"]["image"] = f"{name}_example_0.png"
    # the scale node makes ~1024² of it: the tiny model edits the 64-pixel image as it is, on the CPU
    # (TextEncodeQwenImageEdit still scales its own copies to ~1024², as it does any image)
    for node, input_name in unscaled:
        prompt[node]["inputs"][input_name] = [load, 0]
    result = client.run(prompt, timeout=600)
    assert result.ok, result.error or server.log_tail()
    lora = server.base / "models" / "loras" / "ci" / f"{name}_000004.safetensors"
    assert lora.is_file() and lora.with_name(f"{name}_000004.eri-state").is_file()
    assert [e["step"] for e in result.events_of("eridiffusion.step") if e["node"] == "7"] == [1, 2, 3, 4]
    image = result.outputs(save)["images"][0]
    with Image.open(server.base / "output" / image["subfolder"] / image["filename"]) as edited:
        assert edited.size == (64, 64)


def test_cancel_stops_training_within_a_step_and_the_server_keeps_serving(client, server):
    write_images(server.base / "input" / "cancel_images", [(64, 64)] * 2)
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    prompt = tiny_training_prompt(api, "cancel_images", steps=100000, prefix="ci/cancelled")
    # a prefix of its own: another run's saves under the example's prefix would send these to <prefix>_v2
    prompt["7"]["inputs"]["save_prefix"] = "ci/cancel_checkpoints/sdxl_lora"
    seen = []

    def on_event(event):
        if event["type"] == "eridiffusion.step":
            seen.append(event["data"]["step"])
            if len(seen) == 3:
                threading.Thread(target=client.post_json, args=("/interrupt", {})).start()

    result = client.run(prompt, timeout=300, on_event=on_event)
    assert any(e["type"] == "execution_interrupted" for e in result.events)
    assert 3 <= len(seen) <= 5, seen
    # the example saves every 250 steps, so Cancel keeps the last finished step, with its state, to resume
    kept = server.base / "models" / "loras" / "ci" / "cancel_checkpoints" / f"sdxl_lora_{seen[-1]:06d}.safetensors"
    assert kept.is_file() and kept.with_name(kept.stem + ".eri-state").is_file(), server.log_tail()
    # the canvas is told the run was cancelled, at which step, and where that step went
    ends = [e for e in result.events_of("eridiffusion.run") if e["state"] != "running"]
    assert [(e["state"], e["step"], e["saved"]) for e in ends] == \
        [("cancelled", seen[-1], f"ci/cancel_checkpoints/sdxl_lora_{seen[-1]:06d}.safetensors")]
    history = client.get_json("/eridiffusion/history/7")
    assert (history["state"], history["stopped_step"], history["saved"], history["running"]) == \
        ("cancelled", seen[-1], ends[0]["saved"], False), "a reloaded page reads the same"
    again = client.run({"1": {"class_type": "EriTestTinyModel", "inputs": {"arch": "sdxl", "seed": 1}},
                        "2": {"class_type": "EriCreateAdapter", "inputs": {
                            "model": ["1", 0], "adapter_type": "lora", "rank": 2, "alpha": 2.0,
                            "target": "attention", "seed": 0, "dtype": "fp32"}},
                        "3": {"class_type": "EriSaveAdapter", "inputs": {"adapter": ["2", 0],
                                                                        "filename_prefix": "ci/after_cancel",
                                                                        "save_dtype": "fp16"}}}, timeout=120)
    assert again.ok, again.error


@pytest.mark.slow
def test_a_hundred_training_prompts_back_to_back_do_not_grow_the_servers_memory(client, server):
    """Every prompt trains a new adapter on the same cached MODEL, latents and captions (only the seed changes,
    so ComfyUI reruns the training); what a run allocates must be given back. Bound: 64 MiB of resident
    memory between run 20 and run 100 (the Python allocator and ComfyUI's caches settle by run 20)."""
    write_images(server.base / "input" / "memory_images", [(64, 64)] * 2)
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    prompt = tiny_training_prompt(api, "memory_images", steps=2, prefix="ci/memory")
    del prompt["10"]                                       # no sampling
    prompt["7"]["inputs"].pop("sampling")
    prompt["7"]["inputs"]["save_every"] = 0

    def resident_mib():
        status = (Path("/proc") / str(server.process.pid) / "status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024

    sizes = {}
    for run_number in range(1, 101):
        prompt["6"]["inputs"]["seed"] = run_number
        prompt["8"]["inputs"]["filename_prefix"] = "ci/memory/run"
        result = client.run(prompt, timeout=120)
        assert result.ok, result.error or server.log_tail()
        if run_number in (20, 100):
            sizes[run_number] = resident_mib()
    print(f"resident memory of the server: run 20 {sizes[20]:.0f} MiB, run 100 {sizes[100]:.0f} MiB")
    assert sizes[100] - sizes[20] < 64, sizes
