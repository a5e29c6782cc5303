"""The real ComfyUI frontend (comfyui-frontend-package, served by the live test server) in Debian's headless
Chromium, driven by Playwright: the example workflows load and queue as a user would, and the Train steps
node's live loss chart follows the run step by step, on the classic canvas and with Nodes 2.0 (the frontend's
Vue-rendered nodes), also after a page reload in the middle of a run. The template browser shows each example
with its title, description and thumbnail, and opens it.

Screenshots go to $ERI_TEST_ARTIFACTS (default test-artifacts/). Chromium comes from scripts/setup (apt-get);
without it these tests are skipped, never `playwright install`-ed.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest

from conftest import write_images
from frontend_page import APP_READY, CHROMIUM, TUTORIAL_DONE_SETTING, launch, load, open_app
from live_server import PACK_LINK_NAME
from workflow_format import api_to_ui, tiny_training_prompt, ui_to_api

pytestmark = [pytest.mark.server, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
# The frontend of ComfyUI 0.33 (1.49) also notes a workflow's model files that the server lacks, as "... is
# missing": the example's model (not in the test server's models/), not a node the pack failed to register.
MODEL_FILE_NOTICE = re.compile(r"model file|\.safetensors", re.IGNORECASE)
# "Modern Node Design (Nodes 2.0)" in the settings dialog: nodes drawn as Vue components over the canvas
# (frontend 1.32 and 1.49 both have it).
NODES_2_SETTING = "Comfy.VueNodes.Enabled"
# What the template browser shows of each example (web/js/templates.js hands it to the frontend).
TEMPLATES_INDEX = ROOT / "web" / "templates.json"


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
        browser = launch(pw)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, client):
    client.post_json("/settings", {TUTORIAL_DONE_SETTING: True})
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    open_app(page, server.url)
    yield page
    context.close()


@pytest.fixture(params=["classic", "nodes2"])
def node_design(request, client):
    """The node design the page opens with (a server-side setting, read when the page loads): "classic"
    (LiteGraph draws the nodes on its canvas) or "nodes2" (Nodes 2.0). Put back to classic afterwards: the
    server, and its settings, last the whole session."""
    client.post_json("/settings", {NODES_2_SETTING: request.param == "nodes2"})
    yield request.param
    client.post_json("/settings", {NODES_2_SETTING: False})


def show_node(page, node_id: int) -> None:
    """Zoom to 100 % with the node in the middle of the view, as a user watching it would (after a reload,
    once the frontend has restored the workflow)."""
    page.wait_for_function("(id) => app.graph.getNodeById(id)", arg=node_id, timeout=60_000)
    page.evaluate("""(id) => { app.canvas.ds.scale = 1; app.canvas.centerOnNode(app.graph.getNodeById(id));
                               app.canvas.setDirty(true, true); }""", node_id)
    page.wait_for_timeout(300)


def chart_clip(page, node_id: int) -> dict:
    """Where the node's chart is on the page (CSS pixels): the Vue widget's own <canvas> with Nodes 2.0, the
    widget's rows of the graph canvas otherwise."""
    return page.evaluate("""(id) => {
        const vueCanvas = document.querySelector(`[data-node-id="${id}"] canvas`);
        if (vueCanvas) {
            const r = vueCanvas.getBoundingClientRect();
            return {x: r.left, y: r.top, width: r.width, height: r.height};
        }
        const node = app.graph.getNodeById(id);
        const widget = node.widgets.find((w) => w.name === "eri_loss_chart");
        const { offset, scale } = app.canvas.ds;
        const r = app.canvas.canvas.getBoundingClientRect();
        const height = (widget.computeSize?.(node.size[0])[1] ?? 180) * scale;
        return {x: r.left + (node.pos[0] + offset[0]) * scale, y: r.top + (node.pos[1] + widget.y + offset[1]) * scale,
                width: node.size[0] * scale, height};
    }""", node_id)


def chart_sample(page, node_id: int, path: Path) -> dict:
    """The node's run as the page holds it and the chart as it looks now (a screenshot of just the chart)."""
    sample = page.evaluate("(id) => { const r = window.EriDiffusion.runOf(id); "
                           "return {steps: r.steps.length, drawn: r.drawn, running: r.running}; }", node_id)
    page.screenshot(path=str(path), clip=chart_clip(page, node_id))
    sample["image"] = path.read_bytes()
    return sample


def wait_for_images(page, node_id: int) -> None:
    """Until the node shows images: node.imgs on the classic canvas; with Nodes 2.0 the Vue node shows them as
    <img> elements (loaded, so that a screenshot has them) and leaves node.imgs unset."""
    page.wait_for_function("""(id) => {
        if (app.graph.getNodeById(id)?.imgs?.length > 0) return true;
        const imgs = [...document.querySelectorAll(`[data-node-id="${id}"] img`)];
        return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
    }""", arg=node_id, timeout=60_000)


def last_run(client, node_id: int, workflow: str) -> dict:
    """The server's history of the node's latest run in that workflow ({} if it never ran)."""
    from urllib.error import HTTPError
    try:
        return client.get_json(f"/eridiffusion/history/{node_id}?workflow={workflow}")
    except HTTPError as error:
        if error.code == 404:
            return {}
        raise


def wait_until(page, predicate: str, arg, failure: str, timeout_ms: int = 30_000) -> None:
    """page.wait_for_function that fails the test saying what did not happen."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function(predicate, arg=arg, timeout=timeout_ms)
    except PlaywrightTimeout:
        pytest.fail(f"{failure} (waited {timeout_ms / 1000:.0f} s)")


def missing_models_listed(page, name: str) -> str:
    """The text of the frontend's list of a loaded workflow's missing models, then closed: 1.32 opens a Missing
    Models dialog; 1.49 shows an "errors found" toast whose View details opens the Errors panel, with a Missing
    Models group (its Download buttons)."""
    dialog = page.locator(".p-dialog:visible", has_text="Missing Models")
    details = page.get_by_role("button", name="View details")
    dialog.first.or_(details.first).wait_for(timeout=10_000)
    if dialog.count():
        listed = " ".join(dialog.all_inner_texts())
        page.screenshot(path=str(artifacts() / f"frontend_missing_models_{name}.png"))
        page.keyboard.press("Escape")
        dialog.first.wait_for(state="hidden", timeout=10_000)
        return listed
    details.first.click()
    group = page.locator('[data-testid="error-group-missing-model"]')
    group.first.wait_for(timeout=10_000)
    listed = " ".join(group.all_inner_texts())
    assert "Download" in listed, listed
    page.screenshot(path=str(artifacts() / f"frontend_missing_models_{name}.png"))
    return listed


def test_every_example_workflow_loads_without_missing_nodes_and_queues_as_its_api_form(page, client):
    info = client.get_json("/object_info")
    examples = sorted(EXAMPLES.glob("*.json"))
    assert examples
    for path in examples:
        ui = json.loads(path.read_text())
        assert load(page, ui) == [], f"{path.name}: missing nodes"
        # the test server has none of the example's models: the frontend's dialog lists each with its download
        models = {m["name"]: m["url"] for n in ui["nodes"] for m in n.get("properties", {}).get("models", [])}
        assert models, f"{path.name}: model download hints on its loaders"
        listed = missing_models_listed(page, path.stem)
        assert all(name in listed for name in models), f"{path.name}: the missing-models list says {listed}"
        notices = page.locator(".p-dialog:visible, .p-toast-message:visible", has_text=re.compile("missing", re.I))
        notices = notices.filter(has_not_text=MODEL_FILE_NOTICE)
        assert not notices.count(), f"{path.name}: a dialog says missing: {notices.all_inner_texts()}"
        note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "ComfyUI/input/training_images" in note and all(name in note for name in models)
        prompt = page.evaluate("""async () => {
            const { output } = await app.graphToPrompt();
            return Object.fromEntries(Object.entries(output).map(([id, n]) => [id, {class_type: n.class_type,
                                                                                   inputs: n.inputs}]));
        }""")
        expected = {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in ui_to_api(ui, info).items()}
        assert prompt == expected, f"{path.name}: the Queue button sends the workflow's API form"
    assert page.errors == []


def test_the_template_browser_shows_each_example_once_with_its_title_description_and_thumbnail_and_opens_it(
        page, client):
    thumbnails = {}
    prefix = f"/api/workflow_templates/{PACK_LINK_NAME}/"
    page.on("response", lambda r: thumbnails.__setitem__(r.url.split(prefix)[1], (r.status, r.headers.get(
        "content-type"))) if prefix in r.url and r.url.endswith(".jpg") else None)
    index = json.loads(TEMPLATES_INDEX.read_text())
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator("[role=dialog]:visible")   # PrimeVue's in 1.32, reka-ui's in 1.49
    # The pack's category, under the name its locale gives it rather than the folder's.
    dialog.get_by_text(index["title"], exact=True).first.click()
    cards = dialog.locator('[data-testid^="template-workflow-"]')
    wait_until(page, "(n) => document.querySelectorAll('[data-testid^=\"template-workflow-\"]').length === n",
               len(index["templates"]), "the pack's category does not show one card per example")
    shown = sorted(card.get_attribute("data-testid").removeprefix("template-workflow-") for card in cards.all())
    assert shown == sorted(p.stem for p in EXAMPLES.glob("*.json")), "each example once"
    for template in index["templates"]:
        card = dialog.locator(f'[data-testid="template-workflow-{template["name"]}"]')
        card.scroll_into_view_if_needed()
        assert card.locator("h3").inner_text() == template["title"]
        # Under the title 1.32 shows the description; 1.49's cards show no template's description.
        assert card.locator("p").all_inner_texts() in ([], [template["description"]])
        wait_until(page, """(name) => [...document.querySelectorAll(`[data-testid="template-workflow-${name}"] img`)]
                                 .some((img) => img.complete && img.naturalWidth === 512)""", template["name"],
                   f"{template['name']}: its thumbnail does not show")
        assert thumbnails[template["name"] + ".jpg"] == (200, "image/jpeg")
    page.screenshot(path=str(artifacts() / "frontend_template_browser.png"))
    # Both frontends search the descriptions: each one finds its example (and a search for nothing, none).
    search = dialog.get_by_placeholder(re.compile("Search"))
    card_shown = "(name) => !!document.querySelector(`[data-testid=\"template-workflow-${name}\"]`)"
    for template in index["templates"]:
        search.fill("qqqq zzzz")
        wait_until(page, f"(name) => !({card_shown})(name)", template["name"], "a search for nothing finds it")
        search.fill(template["description"])
        wait_until(page, card_shown, template["name"], f"its description does not find {template['name']}")
    search.fill("")

    dialog.locator('[data-testid="template-workflow-sdxl_lora"]').click()
    example = json.loads((EXAMPLES / "sdxl_lora.json").read_text())
    wait_until(page, "(id) => (app.rootGraph ?? app.graph)?.id === id", example["id"],
               "clicking the card did not open the example")
    types = page.evaluate("app.graph.nodes.map((n) => n.type).sort()")
    assert types == sorted(n["type"] for n in example["nodes"])
    assert page.errors == []


def test_queued_training_draws_the_live_loss_chart_step_by_step_and_it_survives_a_reload_mid_run(
        node_design, page, client, server):
    vue_nodes = page.evaluate(f"app.extensionManager.setting.get({json.dumps(NODES_2_SETTING)})")
    assert vue_nodes == (node_design == "nodes2")
    write_images(server.base / "input" / "browser_images", [(64, 64)] * 3)
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    steps = 400   # long enough that the reload lands mid-run even with one fast CPU thread
    ui = api_to_ui(tiny_training_prompt(api, "browser_images", steps=steps, prefix="ci/browser"), info)
    assert load(page, ui) == []
    workflow = page.evaluate("window.EriDiffusion.workflowId()")
    assert workflow, "the loaded workflow has an id (the frontend sends it with the prompt)"
    stale = last_run(client, 7, workflow).get("prompt_id")
    show_node(page, 7)
    assert page.locator('[data-node-id="7"]').count() == (1 if vue_nodes else 0), "the node design in use"
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    # ["steps", n]: the page has n steps of this run; ["drawn", n]: its chart was last drawn with n steps.
    run_has = "([what, n]) => { const r = window.EriDiffusion.runOf('7'); " \
              f"return r && r.prompt_id !== {json.dumps(stale)} && " \
              "(what === 'steps' ? r.steps.length : r.drawn) >= n; }"
    # The chart follows the run: two looks at it while it trains, the second drawn with more steps and
    # looking different (Nodes 2.0 on 1.32.9 and 1.58.1 drew the chart once and never again). A chart is
    # drawn within a frame of its step; 30 s leave room for a busy machine.
    page.wait_for_function(run_has, arg=["steps", 3], timeout=180_000)
    wait_until(page, run_has, ["drawn", 3], "the chart was never drawn with the run's first 3 steps")
    first = chart_sample(page, 7, artifacts() / f"frontend_train_chart_{node_design}_mid_run_1.png")
    page.wait_for_function(run_has, arg=["steps", first["steps"] + 20], timeout=180_000)
    wait_until(page, run_has, ["drawn", first["drawn"] + 20],
               f"the chart stayed at {first['drawn']} steps drawn while 20 more came")
    second = chart_sample(page, 7, artifacts() / f"frontend_train_chart_{node_design}_mid_run_2.png")
    assert 3 <= first["drawn"] < second["drawn"] < steps, "the chart is redrawn as the steps come"
    assert first["running"] and second["running"]
    assert first["image"] != second["image"], "the chart on the page changed between two steps"

    page.reload()
    page.wait_for_function(APP_READY, timeout=90_000)
    show_node(page, 7)
    page.wait_for_function(f"() => {{ const r = window.EriDiffusion.runOf('7'); return r && r.state === 'finished' "
                           f"&& r.steps.length === {steps} && r.drawn === {steps}; }}", timeout=180_000)
    assert page.evaluate("window.EriDiffusion.stepEvents") > 0, "the page was reloaded while the run went on"
    chart = page.evaluate("(() => { const r = window.EriDiffusion.runOf('7'); "
                          "return {steps: r.steps, losses: r.losses, lrs: r.lrs}; })()")
    history = last_run(client, 7, workflow)
    assert chart["steps"] == list(range(1, steps + 1)), "steps from before the reload came back from the server"
    assert chart == {"steps": history["steps"], "losses": history["losses"], "lrs": history["lrs"]}

    wait_for_images(page, 7)
    wait_for_images(page, 9)   # the Loss graph node: the run is done
    show_node(page, 7)
    page.wait_for_timeout(200)
    shot = artifacts() / f"frontend_train_chart_{node_design}.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert page.errors == []


def test_cancel_shows_the_step_it_stopped_at_and_the_file_it_saved_and_a_reload_shows_both_with_the_samples(
        page, client, server):
    write_images(server.base / "input" / "browser_cancel", [(64, 64)] * 3)
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    prompt = tiny_training_prompt(api, "browser_cancel", steps=100_000, prefix="ci/browser_cancel")
    prompt["7"]["inputs"]["save_prefix"] = "ci/browser_cancel_checkpoints/sdxl_lora"
    sampling = next(n for n in prompt.values() if n["class_type"] == "EriSamplingSettings")
    sampling["inputs"]["every_n_steps"] = 2
    ui = api_to_ui(prompt, info)
    ui["id"] = str(uuid.uuid4())
    assert load(page, ui) == []
    show_node(page, 7)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("() => { const r = window.EriDiffusion.runOf('7'); return r && r.steps.length >= 4 && "
                           "r.images.length >= 2; }", timeout=180_000)
    page.evaluate("async () => { await app.api.interrupt(); }")
    wait_until(page, "() => window.EriDiffusion.runOf('7')?.state === 'cancelled'", None,
               "the chart never said the run was cancelled")
    run = page.evaluate("(() => { const r = window.EriDiffusion.runOf('7'); return {step: r.stopped_step, "
                        "saved: r.saved, lines: window.EriDiffusion.progressLines(r)}; })()")
    step = run["step"]
    assert run["saved"] == f"ci/browser_cancel_checkpoints/sdxl_lora_{step:06d}.safetensors"
    assert (server.base / "models" / "loras" / run["saved"]).is_file()
    assert run["lines"][0].startswith(f"cancelled at step {step}/100000 after ")
    assert run["lines"][1] == f"saved as {run['saved']}"
    chart_sample(page, 7, artifacts() / "frontend_train_chart_cancelled.png")

    page.reload()
    page.wait_for_function(APP_READY, timeout=90_000)
    show_node(page, 7)
    wait_until(page, "() => { const r = window.EriDiffusion.runOf('7'); return r?.state === 'cancelled' && "
                     "r.drawn > 0; }", None, "after a reload the chart did not show the cancelled run")
    assert page.evaluate("window.EriDiffusion.progressLines(window.EriDiffusion.runOf('7'))") == run["lines"]
    wait_for_images(page, 7)   # the samples come back from the server's history, captioned
    shown = page.evaluate("(() => app.graph.getNodeById(7).imgs?.map((i) => i.src) ?? [...document.querySelectorAll("
                          "'[data-node-id=\"7\"] img')].map((i) => i.src))()")
    assert shown and all("eri_preview_step" in src and "type=temp" in src for src in shown), shown
    page.screenshot(path=str(artifacts() / "frontend_train_cancelled_after_reload.png"))
    assert page.errors == []


def test_two_workflows_whose_train_steps_share_a_node_id_keep_their_own_charts(page, client, server):
    write_images(server.base / "input" / "browser_two", [(64, 64)] * 2)
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    first = api_to_ui(tiny_training_prompt(api, "browser_two", steps=4, prefix="ci/browser_two"), info)
    second = json.loads(json.dumps(first))
    first["id"], second["id"] = str(uuid.uuid4()), str(uuid.uuid4())
    assert load(page, first) == []
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    wait_until(page, "() => window.EriDiffusion.runOf('7')?.state === 'finished'", None,
               "the first workflow's run never finished", timeout_ms=180_000)
    assert load(page, second) == []
    show_node(page, 7)
    assert page.evaluate("window.EriDiffusion.runOf('7') === undefined"), \
        "a workflow that never trained shows no other workflow's run"
    assert page.evaluate("window.EriDiffusion.progressLines(window.EriDiffusion.runOf('7'))") == \
        ["waiting for the first step"]
    assert load(page, first) == []
    run = page.evaluate("(() => { const r = window.EriDiffusion.runOf('7'); return [r.state, r.steps]; })()")
    assert run == ["finished", [1, 2, 3, 4]]
    assert page.errors == []


def test_an_error_while_running_is_shown_under_the_nodes_display_name(page, client, server):
    folder = server.base / "input" / "browser_broken"
    folder.mkdir(exist_ok=True)
    (folder / "photo.png").write_bytes(b"not a png at all")   # passes the check at Queue, fails when read
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    ui = api_to_ui(tiny_training_prompt(api, "browser_broken", steps=2, prefix="ci/browser_broken"), info)
    assert load(page, ui) == []
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    # 1.32 opens an error dialog; 1.49 a "<node title> failed" toast whose View details opens the Errors panel
    dialog = page.locator(".p-dialog:visible")
    details = page.get_by_role("button", name="View details")
    dialog.first.or_(details.first).wait_for(timeout=120_000)
    if dialog.count():
        text = dialog.first.inner_text()
    else:
        assert page.get_by_text("Training images failed").count(), "the toast names the node by its title"
        details.first.click()
        group = page.locator('[data-testid="error-group-execution"]')
        group.first.wait_for(timeout=10_000)
        text = group.first.inner_text()
    page.screenshot(path=str(artifacts() / "frontend_execution_error.png"))
    assert "photo.png" in text and "fix or remove the file" in text, text
    if dialog.count():
        assert "Training images (EriTrainingImages)" in text, text


def test_the_validation_loss_is_drawn_as_dots_on_the_live_chart_and_comes_back_after_a_reload(page, client, server):
    write_images(server.base / "input" / "browser_train", [(64, 64)] * 2)
    write_images(server.base / "input" / "browser_held_out", [(64, 64)] * 2, seed=9, prefix="val")
    info = client.get_json("/object_info")
    api = json.loads((EXAMPLES / "api" / "sdxl_lora.json").read_text())
    prompt = tiny_training_prompt(api, "browser_train", steps=8, prefix="ci/browser_validation")
    del prompt["7"]["inputs"]["sampling"]
    prompt["20"] = {"class_type": "EriTrainingImages",
                    "inputs": dict(prompt["2"]["inputs"], folder="browser_held_out")}
    prompt["21"] = {"class_type": "EriCacheLatents", "inputs": dict(prompt["3"]["inputs"], dataset=["20", 0])}
    prompt["22"] = {"class_type": "EriCacheCaptions", "inputs": dict(prompt["4"]["inputs"], dataset=["20", 0])}
    prompt["7"]["inputs"].update(validation_latents=["21", 0], validation_captions=["22", 0], validation_every=3)
    ui = api_to_ui(prompt, info)
    assert load(page, ui) == []
    show_node(page, 7)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    finished = "() => { const r = window.EriDiffusion.runOf('7'); return r?.state === 'finished' && " \
               "r.drawnValidation === 3; }"
    wait_until(page, finished, None, "the run never finished with its 3 validation points drawn", timeout_ms=180_000)
    run = page.evaluate("(() => { const r = window.EriDiffusion.runOf('7'); return [r.val_steps, r.val_losses]; })()")
    assert run[0] == [3, 6, 8] and all(v > 0 for v in run[1])
    assert run == [last_run(client, 7, page.evaluate("window.EriDiffusion.workflowId()"))[k]
                   for k in ("val_steps", "val_losses")]

    def validation_pixels(name: str) -> int:
        import numpy as np
        from PIL import Image
        path = artifacts() / name
        page.screenshot(path=str(path), clip=chart_clip(page, 7))
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(pixels - np.array([0xff, 0xcc, 0x44])).sum(-1) < 40).sum())   # COLORS.validation
    assert validation_pixels("frontend_validation_chart.png") > 30, "the dots and their legend entry are drawn"
    page.reload()
    page.wait_for_function(APP_READY, timeout=90_000)
    show_node(page, 7)
    wait_until(page, "() => window.EriDiffusion.runOf('7')?.drawnValidation === 3", None,
               "after a reload the validation points came back from the server's history")
    assert validation_pixels("frontend_validation_chart_reloaded.png") > 30
    assert page.errors == []
