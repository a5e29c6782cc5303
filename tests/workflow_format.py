"""API-format prompts <-> the UI-format workflows the ComfyUI frontend loads, using the server's /object_info.

The example workflows are written in API form (what /prompt takes) and converted to UI form with this
module, so the two never disagree; a test checks the committed UI files against a live server.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(info: dict):
    """(name, type, is_widget) of a node's inputs in the frontend's order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            yield name, kind, kind in WIDGET_TYPES


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
        for name, kind, is_widget in _inputs(info):
            value = node["inputs"].get(name)
            if is_widget and not isinstance(value, list):
                widgets.append(value)
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
        rows[column] = row + height + 40
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The prompt the frontend would queue for a UI workflow (nodes with mode 0 only)."""
    link_src = {l[0]: (str(l[1]), l[2]) for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        inputs, widgets = {}, list(node.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, kind, is_widget in _inputs(info):
            if name in linked:
                inputs[name] = list(link_src[linked[name]])
            elif is_widget:
                inputs[name] = widgets.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def tiny_training_prompt(api: dict, images_folder: str, steps: int, prefix: str) -> dict:
    """An example training workflow made runnable on a CPU in seconds: the checkpoint loader becomes the
    test-only tiny model (same MODEL, CLIP, VAE outputs), 64-pixel buckets, fp32, a higher learning rate."""
    prompt = {nid: {"class_type": n["class_type"], "inputs": dict(n["inputs"])} for nid, n in api.items()}
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
        elif kind == "EriSaveAdapter":
            inputs["filename_prefix"] = prefix
    return prompt
