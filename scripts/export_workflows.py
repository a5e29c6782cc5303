"""Regenerate the UI-format example workflows from their API forms (example_workflows/api/*.json),
with the node definitions of a real ComfyUI server started for the purpose.

    .venv/bin/python scripts/export_workflows.py
"""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from live_server import ComfyClient, ComfyServer  # noqa: E402
from workflow_format import _default, _inputs, example_ui  # noqa: E402


def with_all_widgets(api: dict, info: dict) -> dict:
    """The API form with every widget input spelled out (missing ones get the node's default), as the
    frontend writes it when it saves the UI form back to API form."""
    out = {}
    for nid, node in api.items():
        inputs = dict(node["inputs"])
        node_info = info[node["class_type"]]
        for name, _, is_widget, _ in _inputs(node_info):
            if is_widget and name not in inputs:
                inputs[name] = _default(node_info, name)
        out[nid] = {**node, "inputs": inputs}
    return out


def write_api(path: Path, api: dict) -> None:
    lines = [f"  {json.dumps(nid)}: {json.dumps(node)}" for nid, node in api.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main():
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server:
        info = ComfyClient(server.url).get_json("/object_info")
        for api_path in sorted((ROOT / "example_workflows" / "api").glob("*.json")):
            api = json.loads(api_path.read_text())
            complete = with_all_widgets(api, info)
            if complete != api:
                write_api(api_path, complete)
                print("completed", api_path.relative_to(ROOT))
            ui = example_ui(api_path.stem, complete, info)
            out = ROOT / "example_workflows" / api_path.name
            out.write_text(json.dumps(ui, indent=1) + "\n")
            print("wrote", out.relative_to(ROOT))


if __name__ == "__main__":
    main()
