"""A training run never loses what it trained: NaN/inf losses, running out of GPU memory, bad saves."""
import contextlib
import logging
import math

import pytest
import torch

import comfy.model_management
from helpers import prepared, run, train


@pytest.fixture
def p(comfy_folders, tiny):
    return prepared(comfy_folders, tiny)


def _poison_steps(monkeypatch, bad_steps):
    """Make the loss of the given (1-based) micro-batches NaN."""
    from eridiffusion.trainers.loop import TrainingRun
    original = TrainingRun._loss
    calls = {"n": 0}

    def loss(self, *args):
        calls["n"] += 1
        value = original(self, *args)
        return value * math.nan if calls["n"] in bad_steps else value
    monkeypatch.setattr(TrainingRun, "_loss", loss)


def test_a_nan_loss_stops_with_an_error_naming_the_step_and_keeps_the_last_good_adapter(p, monkeypatch):
    from eridiffusion.trainers.loop import TrainingError
    _, good, _ = train(p, 3)
    _poison_steps(monkeypatch, {4})
    with pytest.raises(TrainingError, match=r"the loss became nan at step 4: lower the learning rate") as error:
        train(p, 6)
    kept = error.value.state
    assert kept.step == 3 and all(torch.equal(good.weights[k], kept.weights[k]) for k in good.weights)


def test_nan_policy_skip_skips_and_counts_bad_steps_without_touching_the_weights(p, monkeypatch, caplog):
    _poison_steps(monkeypatch, {2, 3})
    with caplog.at_level(logging.WARNING):
        _, adapter, history = train(p, 5, nan_policy="skip")
    assert adapter.step == 5 and all(torch.isfinite(w).all() for w in adapter.weights.values())
    assert [math.isnan(x) for x in history.losses] == [False, True, True, False, False]
    assert "the loss became nan at step 3; step skipped (2 so far)" in caplog.text


def test_a_skipped_step_leaves_the_weights_and_adams_step_count_as_the_last_good_step_left_them(p, monkeypatch):
    # The default optimizer (fused AdamW) skips the bad step on the device, before the host has read the loss.
    _, one_step, _ = train(p, 1)
    _poison_steps(monkeypatch, {2})
    _, skipped, history = train(p, 2, nan_policy="skip")
    assert math.isnan(history.losses[-1])
    assert all(torch.equal(one_step.weights[k], skipped.weights[k]) for k in one_step.weights)
    assert {float(s["step"]) for s in skipped.optimizer["state"].values()} == {1.0}
    assert all(torch.equal(one_step.optimizer["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in skipped.optimizer["state"].items())


def test_adamw8bit_skips_a_bad_step_on_the_device_too_and_keeps_its_state_and_step_count(p, monkeypatch):
    # Its step is queued before the host reads the loss as AdamW's is; bitsandbytes counts steps on the host.
    pytest.importorskip("bitsandbytes")
    _, one_step, _ = train(p, 1, optimizer="adamw8bit")
    _poison_steps(monkeypatch, {2})
    _, skipped, history = train(p, 2, optimizer="adamw8bit", nan_policy="skip")
    assert math.isnan(history.losses[-1])
    assert all(torch.equal(one_step.weights[k], skipped.weights[k]) for k in one_step.weights)

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert same(one_step.optimizer["state"], skipped.optimizer["state"])


def test_training_keeps_pythons_collector_off_the_objects_it_started_with_and_gives_them_back(p):
    # A full collection of a ComfyUI server's objects takes a tenth of a second or more: not in the middle of
    # a step. Garbage that existed before is collected first, not kept for the run's length.
    import gc
    import weakref
    from eridiffusion.trainers.loop import train as train_steps
    from helpers import settings

    class Cycle:
        pass
    garbage = Cycle()
    garbage.self = garbage
    collected = weakref.ref(garbage)
    del garbage
    during = []

    def on_step(report):
        during.append((gc.get_freeze_count() > 0, collected() is None))
    assert gc.get_freeze_count() == 0
    with torch.inference_mode(False):
        train_steps(p["model"], p["adapter"], p["latents"], p["captions"], settings(), 2, on_step=on_step)
    assert during == [(True, True), (True, True)]
    assert gc.get_freeze_count() == 0


def test_training_freezes_the_processs_objects_also_when_a_few_were_frozen_before(p):
    # The GPU machine's Python starts with a few hundred frozen objects: the run must not take that as
    # "someone else manages the collector" and leave the 400k objects of ComfyUI and the model to it.
    import gc
    from eridiffusion.trainers.loop import train as train_steps
    from helpers import settings
    gc.freeze()          # stands in for whatever froze the interpreter's start-up objects
    before = gc.get_freeze_count()
    during = []
    try:
        with torch.inference_mode(False):
            train_steps(p["model"], p["adapter"], p["latents"], p["captions"], settings(), 1,
                        on_step=lambda report: during.append(gc.get_freeze_count()))
    finally:
        gc.unfreeze()
    assert during[0] > before      # what was created since the first freeze is frozen too


@pytest.mark.parametrize("stop", [None, comfy.model_management.InterruptProcessingException, RuntimeError])
def test_comfyuis_in_training_flag_is_set_while_training_and_restored_after_success_cancel_and_errors(
        p, monkeypatch, stop):
    # ComfyUI 0.33's models and ops read the flag to take their autograd-safe paths (Flux's rotary embedding).
    # 0.3.75 has no flag: one is given here, so the test checks the same on both.
    from eridiffusion.trainers.loop import train as train_steps
    from helpers import settings
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    during = []

    def on_step(report):
        during.append(comfy.model_management.in_training)
        if stop is not None and report.step == 2:
            raise stop("stopped at step 2")
    stops = contextlib.nullcontext() if stop is None else pytest.raises(stop)
    with torch.inference_mode(False), stops:
        train_steps(p["model"], p["adapter"], p["latents"], p["captions"], settings(), 3, on_step=on_step)
    assert during == ([True] * 3 if stop is None else [True, True])
    assert comfy.model_management.in_training is False


def test_nan_policy_skip_still_stops_after_ten_bad_steps_in_a_row(p, monkeypatch):
    from eridiffusion.trainers.loop import TrainingError
    _poison_steps(monkeypatch, set(range(2, 30)))
    with pytest.raises(TrainingError, match=r"at step 11 \(10 steps in a row\)") as error:
        train(p, 20, nan_policy="skip")
    assert error.value.state.step == 10


def test_nan_weights_are_never_written_over_a_good_file(p, comfy_folders):
    from eridiffusion.nodes.adapter import EriSaveAdapter
    _, adapter, _ = train(p, 2)
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix="nan", save_dtype="fp32")[0]
    before = (comfy_folders["loras"] / name).read_bytes()
    poisoned = adapter.replace(weights={k: v * math.nan for k, v in adapter.weights.items()})
    with pytest.raises(ValueError, match=r"NaN/inf weights at step 2 .* not saved, so 'nan_000002.safetensors' "
                                         r"is not overwritten"):
        run(EriSaveAdapter, adapter=poisoned, filename_prefix="nan", save_dtype="fp32")
    assert (comfy_folders["loras"] / name).read_bytes() == before


def test_out_of_memory_names_the_settings_to_change_unloads_the_models_and_keeps_the_steps_done(p, monkeypatch):
    from eridiffusion.trainers.loop import TrainingError, TrainingRun
    original = TrainingRun._loss
    calls = {"n": 0}

    def loss(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args)
    monkeypatch.setattr(TrainingRun, "_loss", loss)
    with pytest.raises(TrainingError, match=r"out of GPU memory at step 3 \(batch_size 1, resolution 64, "
                                            r"gradient_checkpointing off\): lower batch_size .* turn "
                                            r"gradient_checkpointing on, load the model with weight_dtype "
                                            r"fp8_e4m3fn, or turn optimizer_offload on") as error:
        train(p, 5)
    assert error.value.state.step == 2
    assert comfy.model_management.current_loaded_models == []
    monkeypatch.setattr(TrainingRun, "_loss", original)
    _, after, _ = train(p, 1)   # and the next prompt trains
    assert after.step == 1


def _train_node(p, steps, adapter=None, **node_inputs):
    from eridiffusion.nodes.train import EriTrainSteps
    from helpers import settings
    return run(EriTrainSteps, model=p["model"], adapter=adapter or p["adapter"], latents=p["latents"],
               captions=p["captions"], settings=settings(schedule="cosine", warmup_steps=1, total_steps=6),
               steps=steps, **node_inputs)[:4]


def test_saves_every_n_steps_keep_the_last_k_and_each_resumes_bit_exactly(p, comfy_folders):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    _, straight, _, _ = _train_node(p, 6)
    _, trained, _, _ = _train_node(p, 6, save_every=2, keep_last=2, save_prefix="ckpt/run")
    assert sorted(f.name for f in (comfy_folders["loras"] / "ckpt").iterdir()) == [
        "run_000004.eri-state", "run_000004.safetensors", "run_000006.eri-state", "run_000006.safetensors"]
    resumed = run(EriLoadAdapter, lora_name="ckpt/run_000004.safetensors")[0]
    assert resumed.step == 4
    _, continued, _, _ = _train_node(p, 2, adapter=resumed)
    assert continued.history.losses == straight.history.losses == trained.history.losses
    assert all(torch.equal(straight.weights[k], continued.weights[k]) for k in straight.weights)


def test_cancel_keeps_the_adapter_of_the_last_finished_step_and_it_resumes_exactly(p, comfy_folders, monkeypatch):
    import comfy.utils
    from eridiffusion.nodes.adapter import EriLoadAdapter
    _, straight, _, _ = _train_node(p, 6)
    calls = {"n": 0}
    update = comfy.utils.ProgressBar.update_absolute

    def cancel_at_step_3(self, value, total=None, preview=None):
        calls["n"] += 1
        if calls["n"] == 3:   # the user presses Cancel during step 3; ComfyUI raises at the progress update
            raise comfy.model_management.InterruptProcessingException()
        return update(self, value, total, preview)
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel_at_step_3)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train_node(p, 6, save_every=100, save_prefix="cancelled/run")
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", update)
    assert (comfy_folders["loras"] / "cancelled" / "run_000003.safetensors").is_file()
    kept = run(EriLoadAdapter, lora_name="cancelled/run_000003.safetensors")[0]
    assert kept.step == 3
    _, continued, _, _ = _train_node(p, 3, adapter=kept)
    assert continued.history.losses == straight.history.losses
    assert all(torch.equal(straight.weights[k], continued.weights[k]) for k in straight.weights)


def test_cancel_is_seen_after_the_step_it_was_pressed_in_even_when_the_progress_bar_sends_nothing(
        p, comfy_folders, monkeypatch):
    # ComfyUI 0.33's progress bar throttles its updates, and ComfyUI checks Cancel in an update it sends and in
    # its layers' forward (which a CUDA graph's replay skips): the next step must not even start.
    import comfy.utils
    from eridiffusion.trainers.loop import TrainingRun
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", lambda self, value, total=None, preview=None: None)
    step = TrainingRun.step
    started = []

    def cancel_during_step_2(self, **options):
        started.append(self.step_count + 1)
        report = step(self, **options)
        if report.step == 2:
            comfy.model_management.interrupt_current_processing()
        return report
    monkeypatch.setattr(TrainingRun, "step", cancel_during_step_2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train_node(p, 6, save_every=100, save_prefix="cancelled/run")
    assert started == [1, 2]
    assert sorted(f.name for f in (comfy_folders["loras"] / "cancelled").iterdir()) == [
        "run_000002.eri-state", "run_000002.safetensors"]


def test_a_save_prefix_outside_the_loras_folder_fails_before_training(p):
    with pytest.raises(ValueError, match="save_prefix"):
        _train_node(p, 2, save_every=1, save_prefix="../../escape")
