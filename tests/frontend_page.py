"""The real ComfyUI frontend in Debian's headless Chromium, driven by Playwright: what the browser tests and
scripts/export_thumbnails.py share (which browser, opening the app, loading a workflow as a drop does).

Chromium comes from scripts/setup (apt-get, or ERI_CHROMIUM): never `playwright install`-ed, which would
download a browser of its own.
"""
from __future__ import annotations

import os
import shutil

CHROMIUM = os.environ.get("ERI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]
APP_READY = "window.app?.graph && window.LiteGraph && window.EriDiffusion"
# Set, the frontend opens no Templates dialog on a first visit (1.49's opens late, after open_app's Escape).
TUTORIAL_DONE_SETTING = "Comfy.TutorialCompleted"


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)


def open_app(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function(APP_READY, timeout=90_000)
    # A first visit opens the Templates dialog over the canvas.
    page.wait_for_timeout(500)
    for _ in range(3):
        if not page.locator(".p-dialog:visible").count():
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def load(page, workflow: dict) -> list:
    """Load a UI workflow as dropping it on the canvas does; returns the missing-node reports it caused and
    the types of loaded nodes that no registered node type backs (frontend 1.49 reports missing nodes in a
    panel of its own, not through showMissingNodesError)."""
    return page.evaluate("""async (workflow) => {
        const missing = [];
        const show = app.showMissingNodesError;
        app.showMissingNodesError = function (types) { missing.push(types); return show.apply(this, arguments); };
        try { await app.loadGraphData(workflow); } finally { app.showMissingNodesError = show; }
        for (const node of app.graph.nodes) {
            if (!(node.type in LiteGraph.registered_node_types)) missing.push(node.type);
        }
        return missing;
    }""", workflow)
