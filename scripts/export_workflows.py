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
from workflow_format import api_to_ui  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server:
        info = ComfyClient(server.url).get_json("/object_info")
        for api_path in sorted((ROOT / "example_workflows" / "api").glob("*.json")):
            ui = api_to_ui(json.loads(api_path.read_text()), info)
            out = ROOT / "example_workflows" / api_path.name
            out.write_text(json.dumps(ui, indent=1) + "\n")
            print("wrote", out.relative_to(ROOT))


if __name__ == "__main__":
    main()
