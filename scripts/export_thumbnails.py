"""Regenerate the template browser's thumbnails of the example workflows (example_workflows/<name>.jpg, which
ComfyUI serves beside <name>.json): each example loaded into the real frontend of a ComfyUI server started for
the purpose, in headless Chromium, the whole graph in view, the canvas's pixels saved as a small
square JPEG (the browser's cards are square).

    .venv/bin/python scripts/export_thumbnails.py [NAME ...]

Needs Debian's chromium (scripts/setup installs it) or ERI_CHROMIUM. Run it after scripts/export_workflows.py
when an example's graph changed.
"""
import base64
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from frontend_page import CHROMIUM, TUTORIAL_DONE_SETTING, launch, load, open_app  # noqa: E402
from live_server import ComfyClient, ComfyServer  # noqa: E402

EXAMPLES = ROOT / "example_workflows"
VIEW = 1200      # CSS pixels of the square page the graph is drawn in
SIZE = 512       # pixels of the thumbnail's side
MARGIN = 30      # graph units of canvas around the nodes
QUALITY = 80     # JPEG quality: about 20-40 KB a thumbnail
SETTINGS = {
    TUTORIAL_DONE_SETTING: True,
    # The test server has none of the examples' models: no dialog over the graph.
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    # Nodes drawn by LiteGraph on the canvas (not as Vue components over it), in full at any zoom (not as
    # blank boxes), without the frame rate in a corner.
    "Comfy.VueNodes.Enabled": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Graph.CanvasInfo": False,
}


def render(page, workflow: dict) -> bytes:
    """The workflow as the canvas draws it, every node in view, as a SIZE x SIZE JPEG: the canvas's own pixels,
    so no menu or dialog of the page is in the picture."""
    from PIL import Image
    missing = load(page, workflow)
    if missing:
        raise RuntimeError(f"missing nodes: {missing}")
    png = page.evaluate("""(margin) => {
        const canvas = app.canvas, el = canvas.canvas;
        canvas.deselectAll?.();
        let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
        for (const node of app.graph.nodes) {
            const [x, y, w, h] = node.boundingRect;
            [x0, y0, x1, y1] = [Math.min(x0, x), Math.min(y0, y), Math.max(x1, x + w), Math.max(y1, y + h)];
        }
        const scale = Math.min(el.width / (x1 - x0 + 2 * margin), el.height / (y1 - y0 + 2 * margin));
        canvas.ds.scale = scale;
        canvas.ds.offset[0] = el.width / scale / 2 - (x0 + x1) / 2;
        canvas.ds.offset[1] = el.height / scale / 2 - (y0 + y1) / 2;
        canvas.setDirty(true, true);
        canvas.draw(true, true);
        return el.toDataURL("image/png");
    }""", MARGIN)
    shot = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))).convert("RGB")
    side = min(shot.size)
    left, top = (shot.width - side) // 2, (shot.height - side) // 2
    out = io.BytesIO()
    shot.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS).save(
        out, "JPEG", quality=QUALITY, optimize=True, progressive=True)
    return out.getvalue()


def main(names: list[str]) -> None:
    if not CHROMIUM:
        sys.exit("no Chromium: install Debian's chromium (scripts/setup) or set ERI_CHROMIUM")
    from playwright.sync_api import sync_playwright
    paths = [EXAMPLES / f"{name}.json" for name in names] or sorted(EXAMPLES.glob("*.json"))
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server, sync_playwright() as pw:
        ComfyClient(server.url).post_json("/settings", SETTINGS)
        browser = launch(pw)
        page = browser.new_page(viewport={"width": VIEW, "height": VIEW})
        open_app(page, server.url)
        for path in paths:
            out = path.with_suffix(".jpg")
            out.write_bytes(render(page, json.loads(path.read_text())))
            print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:])
