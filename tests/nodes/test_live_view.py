"""What the canvas is told about a Train steps run (nodes/live.py): its state at the end (finished, cancelled,
failed with the error's first line, and where the adapter went), kept per workflow and node, in bounded memory."""
import inspect

import pytest
import torch

from helpers import prepared, settings


def train_node(unique_id: str, workflow_id):
    """EriTrainSteps as ComfyUI's executor runs it for a prompt queued from a workflow with this id."""
    from comfy_api.latest import io
    from eridiffusion.nodes.train import EriTrainSteps
    pnginfo = None if workflow_id is None else {"workflow": {"id": workflow_id, "nodes": []}}
    hidden = {io.Hidden.unique_id: unique_id, io.Hidden.extra_pnginfo: pnginfo}
    # 0.3.75 takes the hidden inputs, 0.33 its V3 data holding them
    takes_v3_data = "v3_data" in inspect.signature(EriTrainSteps.PREPARE_CLASS_CLONE).parameters
    return EriTrainSteps.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if takes_v3_data else hidden)


@pytest.fixture
def live():
    from eridiffusion.nodes import live
    saved = dict(live._histories)
    live._histories.clear()
    yield live
    live._histories.clear()
    live._histories.update(saved)


class Report:
    def __init__(self, step, total, loss=0.5, learning_rate=1e-4):
        self.step, self.total, self.loss, self.learning_rate = step, total, loss, learning_rate


def test_a_finished_run_is_kept_under_its_workflow_and_node_with_its_steps_and_elapsed_time(comfy_folders, tiny,
                                                                                              live):
    p = prepared(comfy_folders, tiny)
    node = train_node("7", "wf-sdxl")
    with torch.inference_mode():
        node.execute(model=p["model"], adapter=p["adapter"], latents=p["latents"], captions=p["captions"],
                     settings=settings(), steps=3)
    h = live.history("7", "wf-sdxl")
    assert (h["state"], h["running"], h["steps"], h["first_step"], h["total"]) == ("finished", False, [1, 2, 3], 0, 3)
    assert h["elapsed_s"] > 0 and h["saved"] is None and h["error"] is None
    assert live.history("7", "") is None and live.history("7", "wf-sd35") is None, \
        "another workflow's node 7 (or a script's prompt) has no chart of this run"


def test_a_run_that_fails_says_so_with_the_errors_first_line_and_the_step_it_reached(comfy_folders, tiny, live,
                                                                                     monkeypatch):
    from eridiffusion.trainers import loop
    p = prepared(comfy_folders, tiny)
    real_step, calls = loop.TrainingRun.step, []

    def failing_step(run, **options):   # the second step fails, as a driver error or a bad batch would
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")
        return real_step(run, **options)
    monkeypatch.setattr(loop.TrainingRun, "step", failing_step)
    node = train_node("7", "wf-a")
    with torch.inference_mode(), pytest.raises(RuntimeError):
        node.execute(model=p["model"], adapter=p["adapter"], latents=p["latents"], captions=p["captions"],
                     settings=settings(), steps=3)
    h = live.history("7", "wf-a")
    assert (h["state"], h["running"], h["stopped_step"], h["steps"]) == ("failed", False, 1, [1])
    assert h["error"] == "CUDA error: an illegal memory access was encountered"


def test_the_error_shown_is_one_line_of_bounded_length():
    from eridiffusion.nodes.live import MAX_ERROR_CHARS, first_line
    assert first_line(ValueError("bad value\nTraceback: more")) == "bad value"
    long = first_line(ValueError("x" * 10_000))
    assert len(long) == MAX_ERROR_CHARS and long.endswith("…")
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_a_cancelled_run_keeps_the_step_it_stopped_at_and_the_file_it_saved(live):
    from eridiffusion.trainers.state import LossHistory
    run = live.LiveRun("7", LossHistory(steps=(1, 2), losses=(1.0, 0.9), learning_rates=(1e-4, 1e-4)), 2, 10, "wf")
    for step in (3, 4):
        run.step(Report(step, 10))
    run.finish(live.CANCELLED, saved="eri/my_lora_000004.safetensors")
    h = live.history("7", "wf")
    assert (h["state"], h["stopped_step"], h["saved"], h["eta_s"]) == \
        ("cancelled", 4, "eri/my_lora_000004.safetensors", None)
    assert h["steps"] == [1, 2, 3, 4] and h["first_step"] == 2, "a chained node's chart marks where it began"


def test_only_a_well_formed_workflow_id_names_a_workflow():
    from eridiffusion.nodes.live import workflow_id
    assert workflow_id({"workflow": {"id": "0b9d6c2e-5d5f-4f2a-9c0e-1f2a3b4c5d6e"}}) == \
        "0b9d6c2e-5d5f-4f2a-9c0e-1f2a3b4c5d6e"
    for malformed in (None, {}, {"workflow": None}, {"workflow": {"id": 7}}, {"workflow": {"id": "../x"}},
                      {"workflow": {"id": "a" * 65}}, {"workflow": {"id": ""}}, "workflow"):
        assert workflow_id(malformed) == "", malformed


def test_prompts_under_ever_new_workflow_ids_keep_at_most_max_runs_histories_dropping_the_stalest(live):
    from eridiffusion.trainers.state import LossHistory
    oldest = live.LiveRun("7", LossHistory(), 0, 5, "wf-0")
    for i in range(1, live.MAX_RUNS + 10):
        live.LiveRun("7", LossHistory(), 0, 5, f"wf-{i}")
        if i == live.MAX_RUNS // 2:
            oldest.step(Report(1, 5))    # an update keeps a run among the kept ones
    kept = {h["workflow"] for h in live.histories()}
    assert len(kept) == live.MAX_RUNS and "wf-0" in kept and "wf-1" not in kept
