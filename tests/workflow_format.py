"""API-format prompts <-> the UI-format workflows the ComfyUI frontend loads, using the server's /object_info.

The example workflows are written in API form (what /prompt takes) and converted to UI form with this
module, so the two never disagree; a test checks the committed UI files against a live server.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: in the workflow, never in the prompt.
VIRTUAL_NODES = {"Note", "MarkdownNote"}
# The frontend adds a "control after generate" widget after a seed that asks for one; examples keep it fixed.
CONTROL_VALUE = "fixed"


def _inputs(info: dict):
    """(name, type, is_widget, has_control_widget) of a node's inputs in the frontend's order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            yield name, kind, kind in WIDGET_TYPES, bool(options.get("control_after_generate"))


def _default(info: dict, name: str):
    """What the frontend puts in a widget the workflow does not set: the input's default (a combo's first
    option)."""
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                return options["default"]
            if isinstance(spec[0], list):
                return spec[0][0] if spec[0] else None
            if spec[0] == "COMBO":
                return (options.get("options") or [None])[0]
    return None


def api_to_ui(api: dict, object_info: dict) -> dict:
    ids = sorted(api, key=int)
    depth = {}

    def node_depth(nid):
        if nid not in depth:
            sources = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((node_depth(s) for s in sources), default=-1)
        return depth[nid]

    links, nodes, out_links = [], [], {}
    for nid in ids:
        for name, value in api[nid]["inputs"].items():
            if isinstance(value, list):
                src, slot = value
                kind = object_info[api[src]["class_type"]]["output"][slot]
                link_id = len(links) + 1
                links.append([link_id, int(src), slot, int(nid), name, kind])
                out_links.setdefault((src, slot), []).append(link_id)
    rows = {}
    for order, nid in enumerate(sorted(ids, key=lambda n: (node_depth(n), int(n)))):
        node = api[nid]
        info = object_info[node["class_type"]]
        column = node_depth(nid)
        row = rows.get(column, 0)
        socket_inputs, widgets = [], []
        for name, kind, is_widget, control in _inputs(info):
            value = node["inputs"].get(name, _default(info, name))
            if is_widget and not isinstance(value, list):
                widgets.append(value)
                if control:
                    widgets.append(CONTROL_VALUE)
            else:
                link = next((l[0] for l in links if l[3] == int(nid) and l[4] == name), None)
                socket_inputs.append({"name": name, "type": kind, "link": link})
        slot_of = {entry["name"]: i for i, entry in enumerate(socket_inputs)}
        for link in links:
            if link[3] == int(nid) and isinstance(link[4], str):
                link[4] = slot_of[link[4]]
        outputs = [{"name": name, "type": kind, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        height = 60 + 26 * (len(socket_inputs) + len(widgets) + len(outputs))
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 380 * column, 40 + row],
                      "size": [340, height], "flags": {}, "order": order, "mode": 0,
                      "inputs": socket_inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
        if node.get("_meta", {}).get("title"):
            nodes[-1]["title"] = node["_meta"]["title"]
        rows[column] = row + height + 40
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The prompt the frontend would queue for a UI workflow (nodes with mode 0 only)."""
    link_src = {l[0]: (str(l[1]), l[2]) for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        info = object_info[node["type"]]
        inputs, widgets = {}, list(node.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, kind, is_widget, control in _inputs(info):
            if name in linked:
                inputs[name] = list(link_src[linked[name]])
            elif is_widget:
                inputs[name] = widgets.pop(0)
                if control:
                    widgets.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            api[str(node["id"])]["_meta"] = {"title": node["title"]}
    return api


# The loaders of full-size models, what the tiny model stands in for, and which of its outputs replaces theirs.
_TINY_ARCH_OF = {"TripleCLIPLoader": "sd3", "DualCLIPLoader": "flux"}
_TINY_OUTPUT_OF = {"UNETLoader": 0, "TripleCLIPLoader": 1, "DualCLIPLoader": 1, "CLIPLoader": 1, "VAELoader": 2}
# CLIPLoader's type -> the tiny architecture its workflow loads (a single text encoder's loader)
_TINY_ARCH_OF_CLIP_TYPE = {"qwen_image": "qwen_image", "chroma": "chroma", "lumina2": "zimage", "flux2": "flux2"}


def _swap_loaders_for_the_tiny_model(prompt: dict) -> None:
    """SD3 / Flux / Chroma / Qwen-Image / Z-Image / Flux.2 workflows load MODEL, CLIP and VAE with separate loaders
    (no tiny model is detected from a file): one EriTestTinyModel takes the place of all of them."""
    loaders = {nid: n["class_type"] for nid, n in prompt.items()
               if n["class_type"] in _TINY_OUTPUT_OF or n["class_type"] == "CheckpointLoaderSimple"}
    arch = next((_TINY_ARCH_OF[k] for k in loaders.values() if k in _TINY_ARCH_OF), None) or next(
        (_TINY_ARCH_OF_CLIP_TYPE.get(prompt[nid]["inputs"].get("type")) for nid, k in loaders.items()
         if k == "CLIPLoader"), None)
    if arch is None:
        return
    tiny_id = min(loaders, key=int)
    remap = {}
    for nid, kind in loaders.items():
        if kind == "CheckpointLoaderSimple":
            remap.update({(nid, 0): [tiny_id, 0], (nid, 2): [tiny_id, 2]})
        else:
            remap[(nid, 0)] = [tiny_id, _TINY_OUTPUT_OF[kind]]
        del prompt[nid]
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and (value[0], value[1]) in remap:
                node["inputs"][name] = remap[(value[0], value[1])]
    prompt[tiny_id] = {"class_type": "EriTestTinyModel", "inputs": {"arch": arch, "seed": 0}}


def tiny_training_prompt(api: dict, images_folder: str, steps: int, prefix: str) -> dict:
    """An example training workflow made runnable on a CPU in seconds: the checkpoint loader becomes the
    test-only tiny model (same MODEL, CLIP, VAE outputs), 64-pixel buckets, fp32, a higher learning rate;
    samples of 64 pixels in 2 sampler steps, every `steps // 2` training steps."""
    prompt = {nid: {"class_type": n["class_type"], "inputs": dict(n["inputs"])} for nid, n in api.items()}
    _swap_loaders_for_the_tiny_model(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "EriTestTinyModel", {"arch": "sdxl", "seed": 0}
        elif kind == "EriTrainingImages":
            inputs.update(folder=images_folder, resolution=64, min_side=64, max_side=128)
        elif kind == "EriTrainingSettings":
            inputs.update(precision="fp32", learning_rate=1e-2, warmup_steps=min(inputs["warmup_steps"], steps // 4),
                          gradient_checkpointing=False)
        elif kind == "EriTrainSteps":
            inputs["steps"] = steps
        elif kind == "EriSamplingSettings":
            inputs.update(width=64, height=64, steps=2, every_n_steps=max(1, steps // 2))
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "EriSaveAdapter":
            inputs["filename_prefix"] = prefix
    return prompt


# Where the examples' model files come from: the frontend's missing-models dialog offers these downloads
# (a node's properties.models), and the example's Note says which folder each goes in.
MODEL_SOURCES = {
    "sd_xl_base_1.0.safetensors": (
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    "sd3.5_large.safetensors": (
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main/sd3.5_large.safetensors"),
    "clip_l.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "clip_g.safetensors": (
        "text_encoders",
        "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/text_encoders/clip_g.safetensors"),
    "t5xxl_fp16.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "flux1-dev.safetensors": (
        "diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    "ae.safetensors": ("vae", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"),
    "qwen_image_fp8_e4m3fn.safetensors": (
        "diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
                            "diffusion_models/qwen_image_fp8_e4m3fn.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (
        "text_encoders", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
                         "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": (
        "vae", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/"
               "qwen_image_vae.safetensors"),
    "Chroma1-HD.safetensors": (
        "diffusion_models", "https://huggingface.co/lodestones/Chroma1-HD/resolve/main/Chroma1-HD.safetensors"),
    "flux1-dev-kontext_fp8_scaled.safetensors": (
        "diffusion_models", "https://huggingface.co/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/"
                            "diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"),
    "qwen_image_edit_fp8_e4m3fn.safetensors": (
        "diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/"
                            "diffusion_models/qwen_image_edit_fp8_e4m3fn.safetensors"),
    "z_image_bf16.safetensors": (
        "diffusion_models", "https://huggingface.co/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/"
                            "z_image_bf16.safetensors"),
    "qwen_3_4b.safetensors": (
        "text_encoders", "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/"
                         "qwen_3_4b.safetensors"),
    "flux2_dev_fp8mixed.safetensors": (
        "diffusion_models", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/"
                            "flux2_dev_fp8mixed.safetensors"),
    "mistral_3_small_flux2_fp8.safetensors": (
        "text_encoders", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/"
                         "mistral_3_small_flux2_fp8.safetensors"),
    "flux2-vae.safetensors": (
        "vae", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
}
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}


def _models_of(node: dict) -> list[dict]:
    return [{"name": value, "url": MODEL_SOURCES[value][1], "directory": MODEL_SOURCES[value][0]}
            for value in node["inputs"].values() if isinstance(value, str) and value in MODEL_SOURCES]


def _note_text(api: dict) -> str:
    dataset = next(n["inputs"] for n in api.values() if n["class_type"] == "EriTrainingImages")
    images, controls = dataset["folder"], dataset.get("control_folder", "")
    models = [m for n in api.values() for m in _models_of(n)]
    saves = [n["inputs"]["filename_prefix"] for n in api.values() if n["class_type"] == "EriSaveAdapter"]
    where = "; ".join(f"{m['name']} in ComfyUI/models/{m['directory']}" for m in models)
    return "\n".join([
        "Before you queue:",
        f"1. Training images: put your images (PNG, JPEG, WEBP; any size) in ComfyUI/input/{images}, or type another "
        "folder of ComfyUI/input in Training images. A .txt file with the same name beside an image is its caption."
        + (f" Edit pairs: each image is the result of an edit, its caption the instruction, and the image before the "
           f"edit goes in ComfyUI/input/{controls} under the same name." if controls else ""),
        f"2. Models: {where}. The missing-models dialog links each download (some need a Hugging Face login).",
        "3. Queue. Train steps draws the loss as it trains, shows samples every N steps, and says when it is done, "
        "cancelled or failed.",
        *(f"4. Save adapter writes ComfyUI/models/loras/{prefix}_<step>.safetensors and its .eri-state beside it "
          "(keep both to resume). Use the LoRA with the stock Load LoRA node." for prefix in saves[:1]),
    ])


def example_ui(name: str, api: dict, object_info: dict) -> dict:
    """An example workflow as the pack ships it: the API form in UI form, with a stable id of its own (the chart
    of its Train steps nodes belongs to it), model download hints on its loaders and a Note on what goes where."""
    import uuid
    ui = api_to_ui(api, object_info)
    ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"eridiffusion/example_workflows/{name}"))
    for node in ui["nodes"]:
        models = _models_of(api[str(node["id"])])
        if models:
            node["properties"]["models"] = models
    note_id = ui["last_node_id"] + 1
    ui["nodes"].append({"id": note_id, "type": "Note", "pos": [40, -300], "size": [720, 260], "flags": {},
                        "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                        "widgets_values": [_note_text(api)], **NOTE_COLORS})
    ui["last_node_id"] = note_id
    return ui
