"""The real ComfyUI frontend (comfyui-frontend-package, served by the live test server) in Debian's headless
Chromium, driven by Playwright: the example workflows load and queue as a user would, and the Train steps
node draws its live loss chart, also after a page reload in the middle of a run.

Screenshots go to $ERI_TEST_ARTIFACTS (default test-artifacts/). Chromium comes from scripts/setup (apt-get);
without it these tests are skipped, never `playwright install`-ed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import write_images
from workflow_format import api_to_ui, tiny_training_prompt, ui_to_api

pytestmark = [pytest.mark.server, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
CHROMIUM = os.environ.get("ERI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]
APP_READY = "window.app?.graph && window.LiteGraph && window.EriDiffusion"
# The frontend of ComfyUI 0.33 (1.49) also notes a workflow's model files that the server lacks, as "... is
# missing": the example's model (not in the test server's models/), not a node the pack failed to register.
MODEL_FILE_NOTICE = re.compile(r"model file|\.safetensors", re.IGNORECASE)


def artifacts() -> Path:
    path = Path(os.environ.get("ERI_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("Debian's chromium is not installed (scripts/setup installs it with apt-get where it can; "
                    "or set ERI_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


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


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    open_app(page, server.url)
    yield page
    context.close()


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


def test_every_example_workflow_loads_without_missing_nodes_and_queues_as_its_api_form(page, client):
    info = client.get_json("/object_info")
    examples = sorted(EXAMPLES.glob("*.json"))
    assert examples
    for path in examples:
        ui = json.loads(path.read_text())
        assert load(page, ui) == [], f"{path.name}: missing nodes"
        notices = page.locator("text=/missing/i >> visible=true").filter(has_not_text=MODEL_FILE_NOTICE)
        assert not notices.count(), f"{path.name}: a dialog says missing"
        prompt = page.evaluate("""async () => {
            const { output } = await app.graphToPrompt();
            return Object.fromEntries(Object.entries(output).map(([id, n]) => [id, {class_type: n.class_type,
                                                                                   inputs: n.inputs}]));
        }""")
        assert prompt == ui_to_api(ui, info), f"{path.name}: the Queue button sends the workflow's API form"
    assert page.errors == []


def test_queued_training_draws_the_live_loss_chart_and_it_survives_a_reload_mid_run(page, client, server):
    write_images(server.base / "input" / "browser_images", [(64, 64)] * 3)
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    steps = 400   # long enough that the reload lands mid-run even with one fast CPU thread
    ui = api_to_ui(tiny_training_prompt(api, "browser_images", steps=steps, prefix="ci/browser"), info)
    try:
        stale = client.get_json("/eridiffusion/history/7")["prompt_id"]
    except Exception:
        stale = None
    assert load(page, ui) == []
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    run_drawn = "(n) => { const r = window.EriDiffusion.runs.get('7'); " \
                f"return r && r.prompt_id !== {json.dumps(stale)} && r.drawn >= n; }}"
    page.wait_for_function(run_drawn, arg=3, timeout=180_000)

    page.reload()
    page.wait_for_function(APP_READY, timeout=90_000)
    page.wait_for_function(f"() => {{ const r = window.EriDiffusion.runs.get('7'); return r && !r.running && "
                           f"r.steps.length === {steps} && r.drawn === {steps}; }}", timeout=180_000)
    assert page.evaluate("window.EriDiffusion.stepEvents") > 0, "the page was reloaded while the run went on"
    chart = page.evaluate("(() => { const r = window.EriDiffusion.runs.get('7'); "
                          "return {steps: r.steps, losses: r.losses, lrs: r.lrs}; })()")
    history = client.get_json("/eridiffusion/history/7")
    assert chart["steps"] == list(range(1, steps + 1)), "steps from before the reload came back from the server"
    assert chart == {"steps": history["steps"], "losses": history["losses"], "lrs": history["lrs"]}

    page.wait_for_function("() => app.graph.getNodeById(7)?.imgs?.length > 0", timeout=60_000)
    page.wait_for_function("() => app.graph.getNodeById(9)?.imgs?.length > 0", timeout=60_000)   # loss graph: done
    page.evaluate("() => { const node = app.graph.getNodeById(7); app.canvas.centerOnNode(node); "
                  "app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(500)
    shot = artifacts() / "frontend_train_chart.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert page.errors == []
