"""An adapter and its training state on disk: one consistent unit whatever happens while saving (a full disk, a
killed process), damaged or mismatched files refused with the file's name and what to do, nothing of another
run overwritten, files with the umask's mode, no temporary files left behind, and states of any length saved."""
import errno
import json
import logging
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion.trainers import checkpoint, files
from eridiffusion.trainers.config import AdapterSpec
from eridiffusion.trainers.state import AdapterState, LossHistory, cpu_copy, new_adapter

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "nodes"))     # helpers.py: the nodes driven in-process, as ComfyUI does
from helpers import prepared, run  # noqa: E402

SPEC = AdapterSpec(arch="sdxl", kind="lora", rank=2, alpha=2.0, targets=(("input_blocks.1.proj", 8, 8),
                                                                         ("output_blocks.0.proj", 8, 4)))


def trained_state(step=2, seed=0, run_id="a" * 32, history_steps=None) -> AdapterState:
    """An adapter as training leaves it: weights, an AdamW state, a generator state, a loss history."""
    gen = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=gen) for k, v in new_adapter(SPEC).weights.items()}
    params = [torch.nn.Parameter(w.clone()) for w in weights.values()]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    steps = tuple(range(1, step + 1)) if history_steps is None else history_steps
    # losses and a decaying learning rate as training makes them: 17 significant digits each in JSON
    history = LossHistory(steps, tuple(0.1 + math.sin(s) / 30 for s in steps),
                          tuple(1e-4 * (1 - s / 4e6) for s in steps))
    return AdapterState(SPEC, weights, step=step, cursor=step, optimizer=cpu_copy(optimizer.state_dict()),
                        optimizer_name="adamw", rng=gen.get_state(), history=history, run_id=run_id)


def save_node(adapter, prefix="eri/my_lora", dtype="fp32"):
    """Save adapter as ComfyUI runs it: (returned name, the text it shows)."""
    from eridiffusion.nodes.adapter import EriSaveAdapter
    with torch.inference_mode():
        out = EriSaveAdapter.execute(adapter=adapter, filename_prefix=prefix, save_dtype=dtype)
    return out.result[0], out.ui.as_dict()["text"][0]


def load_node(name, model=None):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    return run(EriLoadAdapter, lora_name=name, model=model)[0]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------- a full disk
def fill_the_disk_at(monkeypatch, which):
    """The disk fills while the `which`-th file of a save is written (1: the adapter, 2: its state)."""
    write = files.write_file
    calls = {"n": 0}

    def write_until_full(path, data):
        calls["n"] += 1
        if calls["n"] == which:
            with open(path, "wb") as f:
                f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)
    monkeypatch.setattr(files, "write_file", write_until_full)


@pytest.mark.parametrize("which", [1, 2])
def test_a_full_disk_during_a_save_changes_neither_file_of_the_pair_and_says_so(comfy_folders, monkeypatch, which):
    # The issue: the new .safetensors was renamed into place, then the disk filled while writing the state,
    # and the next Load adapter resumed the old run's state with the new weights.
    name, _ = save_node(trained_state(step=2, seed=1, run_id="a" * 32))
    adapter = comfy_folders["loras"] / name
    state = adapter.with_suffix(".eri-state")
    before = adapter.read_bytes(), state.read_bytes()
    write = files.write_file
    fill_the_disk_at(monkeypatch, which)
    with pytest.raises(OSError, match=r"the disk is full while saving .*my_lora_000002\.(safetensors|eri-state): "
                                      r"free space in .* or save elsewhere \(the previous file is untouched\)"):
        save_node(trained_state(step=2, seed=2, run_id="a" * 32))
    assert (adapter.read_bytes(), state.read_bytes()) == before
    assert temporaries(adapter.parent) == []
    monkeypatch.setattr(files, "write_file", write)
    assert same_weights(load_node(name).weights, trained_state(step=2, seed=1).weights)


def test_a_full_disk_reported_by_safetensors_own_writer_gets_the_documented_message(tmp_path):
    # safetensors' save_file (the latent and text caches write with it) raises SafetensorError, not OSError.
    from safetensors import SafetensorError
    path = str(tmp_path / "latent.safetensors")

    def safetensors_full(p):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(OSError, match=r"the disk is full while saving .*latent\.safetensors: free space in .* "
                                      r"\(nothing was written\)") as error:
        files.atomic_write(path, safetensors_full)
    assert error.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (a tmpfs), where there is one: a disk that really fills."""
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_disk_that_really_fills_gives_the_documented_message_for_both_writers(small_disk):
    big = {"w": torch.zeros(200_000)}       # 800 kB: more than the disk holds
    with pytest.raises(OSError, match=r"the disk is full while saving .*adapter\.safetensors"):
        files.save_tensors(str(small_disk / "adapter.safetensors"), big, {})
    with pytest.raises(OSError, match=r"the disk is full while saving .*latent\.safetensors"):
        files.atomic_write(str(small_disk / "latent.safetensors"), lambda p: save_file(big, p))
    assert os.listdir(small_disk) == []


# -------------------------------------------------------------------------------------- a killed process
CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from comfy_env import import_comfyui_in_process, import_pack
import_comfyui_in_process()
import_pack()
from eridiffusion.trainers import checkpoint
state = checkpoint.load_adapter({source!r})
replace = os.replace
renames = []

def replace_then_die(src, dst):
    renames.append(dst)
    if len(renames) == {die_at}:       # killed (SIGKILL, power loss) before this rename
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
os.replace = replace_then_die
checkpoint.save_adapter(state, {target!r}, "fp32")
"""


def save_and_kill(source, target, die_at=2):
    """Save the state saved at `source` to `target` in another process that is killed before its
    `die_at`-th rename."""
    child = textwrap.dedent(CHILD).format(tests=str(TESTS), source=str(source), target=str(target), die_at=die_at)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -9, result.stderr[-3000:]


def test_a_save_killed_between_its_renames_is_refused_at_load_naming_both_files(comfy_folders, tmp_path):
    # Re-saving a step (the same run saving the same step again): killed after the state's rename, the new
    # state sits beside the old adapter. It used to resume the new optimizer and RNG on the old weights.
    name, _ = save_node(trained_state(step=4, seed=1))
    other = str(tmp_path / "other_000004.safetensors")
    checkpoint.save_adapter(trained_state(step=4, seed=2), other, "fp32")
    save_and_kill(other, comfy_folders["loras"] / name)
    with pytest.raises(ValueError, match=r"the training state 'my_lora_000004\.eri-state' belongs to another save "
                                         r"of this adapter \(step 4\) than 'my_lora_000004\.safetensors' \(step 4\).*"
                                         r"Delete 'my_lora_000004\.eri-state' to continue from the weights of "
                                         r"'my_lora_000004\.safetensors' alone, or load a save whose pair is complete"):
        load_node(name)


def test_a_new_save_killed_between_its_renames_leaves_the_earlier_saves_loadable(comfy_folders, tmp_path):
    # A new step's adapter appears only once its state is in place: killed in between, the step is simply not
    # saved (no adapter that would resume without optimizer, RNG and data position).
    name, _ = save_node(trained_state(step=2, seed=1))
    source = str(tmp_path / "source_000004.safetensors")
    checkpoint.save_adapter(trained_state(step=4, seed=2), source, "fp32")
    folder = comfy_folders["loras"] / "eri"
    save_and_kill(source, folder / "my_lora_000004.safetensors")
    assert not (folder / "my_lora_000004.safetensors").exists()
    assert list(checkpoint.saved_steps(lambda step: str(folder / f"my_lora_{step:06d}.safetensors"))) == [2]
    resumed = load_node(name)
    assert resumed.step == 2 and resumed.optimizer is not None


def test_leftovers_of_a_killed_save_are_removed_and_a_save_in_progress_is_not(comfy_folders, tmp_path):
    name, _ = save_node(trained_state(step=4, seed=1))
    folder = comfy_folders["loras"] / "eri"
    source = str(tmp_path / "source_000004.safetensors")
    checkpoint.save_adapter(trained_state(step=4, seed=2), source, "fp32")
    save_and_kill(source, folder / "my_lora_000006.safetensors", die_at=1)    # killed before any rename
    save_and_kill(source, folder / "my_lora_000004.safetensors", die_at=1)
    left = temporaries(folder)
    assert len(left) == 4 and all(len(n) == len(".eri-0123456789ab-01234567.tmp") for n in left)
    # Saving step 4 again removes what the killed save of step 4 left; step 6's may be another process's
    # save in progress as long as it is recent ...
    save_node(trained_state(step=4, seed=1))
    assert len(temporaries(folder)) == 2
    # ... and goes with the next save once it has not been written to for ten minutes.
    for leftover in temporaries(folder):
        os.utime(folder / leftover, (os.path.getmtime(folder / leftover) - 601,) * 2)
    save_node(trained_state(step=8, seed=1))
    assert temporaries(folder) == []


def test_a_cache_folder_is_cleared_of_old_leftovers_by_the_first_write_into_it(tmp_path):
    stale, recent = tmp_path / ".eri-0123456789ab-89abcdef.tmp", tmp_path / ".eri-0123456789ab-01234567.tmp"
    for leftover in (stale, recent):
        leftover.write_bytes(b"half a latent")
    os.utime(stale, (os.path.getmtime(stale) - 3600,) * 2)
    files.atomic_write(str(tmp_path / "latent.safetensors"), lambda p: save_file({"latent": torch.ones(2)}, p))
    assert sorted(os.listdir(tmp_path)) == [recent.name, "latent.safetensors"]


# ------------------------------------------------------------------------------------- without its state
def test_an_adapter_of_ours_without_its_state_resumes_with_a_warning_of_what_is_not_restored(comfy_folders, caplog):
    # A save of an older version killed between the renames left exactly this; it resumed silently.
    name, _ = save_node(trained_state(step=4, seed=1))
    (comfy_folders["loras"] / name).with_suffix(".eri-state").unlink()
    with caplog.at_level(logging.WARNING):
        resumed = load_node(name)
    assert resumed.step == 4 and resumed.optimizer is None and resumed.rng is None and resumed.cursor == 0
    assert same_weights(resumed.weights, trained_state(step=4, seed=1).weights)
    assert ("'my_lora_000004.safetensors' has no training state beside it (my_lora_000004.eri-state is missing): "
            "training continues from its weights at step 4 with a new optimizer") in caplog.text
    assert "the data order from its beginning" in caplog.text


# ----------------------------------------------------------------------------------------- damaged states
def rewrite(path, change):
    """Rewrite a safetensors file (an adapter or a state) with `change(tensors, metadata)` applied."""
    tensors, meta = files.load_tensors(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def set_meta(key, value):
    return lambda tensors, meta: meta.__setitem__(key, value)


def del_meta(key):
    return lambda tensors, meta: meta.pop(key)


def drop_tensor(prefix):
    def change(tensors, meta):
        del tensors[next(k for k in tensors if k.startswith(prefix))]
    return change


DAMAGE = {
    "not safetensors": (None, r"it is not a readable safetensors file: 'Error while deserializing header"),
    "cut short": ("truncate", r"it is not a readable safetensors file"),
    "bad JSON": (set_meta("step", "{{4"), r"its entry 'step' is not JSON: '\{\{4'"),
    "missing key": (del_meta("cursor"), r"its entry 'cursor' is missing"),
    "wrong type": (set_meta("step", '"four"'), r"its entry 'step' is 'four', not a whole number"),
    "negative": (set_meta("cursor", "-3"), r"its cursor is -3, below 0"),
    "bad spec": (set_meta("spec", '{"arch": "sdxl", "rank": "x"}'), r"its adapter description is invalid"),
    "unknown type": (lambda t, m: m.__setitem__("spec", m["spec"].replace('"lora"', '"boft"')),
                     r"its adapter type 'boft' or dtype 'fp32' is unknown"),
    "missing weights": (drop_tensor("weight."), r"its weights do not fit its adapter"),
    "optimizer groups": (set_meta("optimizer", '{"param_groups": 7}'),
                         r"its optimizer's parameter groups are malformed"),
    "optimizer size": (lambda t, m: m.__setitem__("optimizer", json.dumps(
        {"param_groups": [{"params": [0]}], "scalars": {}})), r"its optimizer state is for 1 parameters, its "
                                                              r"adapter has 4"),
    "optimizer paths": (lambda t, m: t.__setitem__("optimizer/zero/exp_avg", torch.ones(1)),
                        r"its optimizer state is malformed"),
    "history": (set_meta("history", '{"steps": [1, 2], "losses": [0.5], "learning_rates": [1, 1]}'),
                r"its loss history's steps, losses and learning rates differ in length"),
    "validation history": (set_meta("history", '{"steps": [1], "losses": [0.5], "learning_rates": [1], '
                                               '"val_steps": [1, 2], "val_losses": [0.5]}'),
                           r"its loss history's validation steps and losses differ in length"),
    "generator": (lambda t, m: t.__setitem__("rng", torch.ones(3)), r"its random generator state is malformed"),
    "huge value": (set_meta("format", "x" * 100_000), r"its format is 'x{50,70}…' \(100,000 characters\)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_state_is_refused_naming_the_file_why_and_what_to_do(comfy_folders, case):
    name, _ = save_node(trained_state(step=2))
    state = (comfy_folders["loras"] / name).with_suffix(".eri-state")
    change, reason = DAMAGE[case]
    if change is None:
        state.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    elif change == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
    else:
        rewrite(state, change)
    with pytest.raises(ValueError, match=r"^the training state 'my_lora_000002\.eri-state' is damaged \("
                                         + reason + r".*\): delete it to continue from the weights alone, or load "
                                                    r"an earlier save$") as error:
        load_node(name)
    assert len(str(error.value)) < 500


# ------------------------------------------------------------------------------------------ NaN weights
def test_nan_weights_in_a_state_or_an_adapter_of_ours_name_the_file_and_the_key(comfy_folders):
    name, _ = save_node(trained_state(step=2))
    adapter = comfy_folders["loras"] / name
    state = adapter.with_suffix(".eri-state")
    poisoned = lambda tensors, meta: tensors.__setitem__("weight.output_blocks.0.proj.lora_up.weight",
                                                         tensors["weight.output_blocks.0.proj.lora_up.weight"] * math.nan)
    rewrite(state, poisoned)
    with pytest.raises(ValueError, match=r"'my_lora_000002\.eri-state' has NaN/inf weights \('output_blocks\.0\.proj"
                                         r"\.lora_up\.weight'\): training or sampling it cannot work; load an "
                                         r"earlier save"):
        load_node(name)
    state.unlink()
    rewrite(adapter, lambda t, m: t.__setitem__("lora_unet_input_blocks_1_proj.lora_down.weight",
                                                      torch.full((2, 8), math.inf)))
    with pytest.raises(ValueError, match=r"'my_lora_000002\.safetensors' has NaN/inf weights "
                                         r"\('input_blocks\.1\.proj\.lora_down\.weight'\).*load an earlier save"):
        load_node(name)


def test_nan_weights_in_another_trainers_file_name_the_file_and_the_key(comfy_folders, tiny):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    with torch.inference_mode(False):
        model = tiny.tiny_model("sdxl")
    adapter = run(EriCreateAdapter, model=model, adapter_type="lora", rank=4, alpha=4.0, target="attention",
                  seed=0, dtype="fp32")[0]
    name, _ = save_node(adapter, "ours")
    tensors = load_file(str(comfy_folders["loras"] / name))
    bad = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[bad] = tensors[bad] * math.nan
    save_file(tensors, str(comfy_folders["loras"] / "kohya.safetensors"))     # kohya keys, no metadata
    with pytest.raises(ValueError, match=r"'kohya\.safetensors' has NaN/inf weights \(.*\): .*load an earlier save"):
        load_node("kohya.safetensors", model)


# --------------------------------------------------------------------------------------- a long history
def header_size(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_the_state_of_a_very_long_run_saves_with_its_recent_losses_exact_and_older_ones_thinned(comfy_folders):
    # 3M steps of history made a header over safetensors' 100 MB limit: every state save failed (after the
    # adapter was written).
    steps = tuple(range(1, 3_000_001))
    state = trained_state(step=3_000_000, history_steps=steps)
    name, _ = save_node(state)
    path = (comfy_folders["loras"] / name).with_suffix(".eri-state")
    assert header_size(path) < 4_000_000
    history = load_node(name).history
    assert len(history.steps) <= checkpoint.MAX_SAVED_HISTORY
    recent = checkpoint.MAX_SAVED_HISTORY // 2
    assert history.steps[-recent:] == state.history.steps[-recent:]
    assert history.losses[-recent:] == state.history.losses[-recent:]
    assert history.steps[0] <= 1024 and list(history.steps) == sorted(set(history.steps))
    assert all(history.losses[i] == state.history.losses[s - 1] for i, s in enumerate(history.steps))
    # saved again after more steps, the older points stay the ones kept before (strides only grow)
    longer = state.replace(history=history.extended(range(3_000_001, 3_000_101), [0.1] * 100, [1e-4] * 100))
    again = longer.history.thinned(checkpoint.MAX_SAVED_HISTORY)
    old = set(again.steps[: -recent])
    assert old <= set(history.steps)


def test_a_long_validation_history_is_thinned_as_the_loss_history_is():
    steps = tuple(range(1, 100_001))
    history = LossHistory(steps[:10], (0.5,) * 10, (1e-4,) * 10, steps, tuple(1.0 / s for s in steps))
    thinned = history.thinned(1000)
    assert thinned.steps == history.steps and len(thinned.val_steps) <= 1000
    assert thinned.val_steps[-500:] == steps[-500:]
    assert all(thinned.val_losses[i] == 1.0 / s for i, s in enumerate(thinned.val_steps))


def test_a_history_within_the_limit_is_saved_exactly(comfy_folders):
    state = trained_state(step=1000)
    name, _ = save_node(state)
    assert load_node(name).history == state.history


# ------------------------------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_mode_of_the_umask(comfy_folders, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        name, _ = save_node(trained_state())
        files.atomic_write(str(tmp_path / "latent.safetensors"), lambda p: save_file({"latent": torch.ones(2)}, p))
    finally:
        os.umask(previous)
    adapter = comfy_folders["loras"] / name
    for path in (adapter, adapter.with_suffix(".eri-state"), tmp_path / "latent.safetensors"):
        assert os.stat(path).st_mode & 0o777 == mode, path


# ------------------------------------------------------------------------------------ prefixes and runs
def test_a_second_run_saving_under_the_same_prefix_saves_as_v2_and_says_so(comfy_folders):
    loras = comfy_folders["loras"]
    first, text = save_node(trained_state(step=2, seed=1, run_id="1" * 32))
    size = (loras / first).stat().st_size / 1024
    assert first == "eri/my_lora_000002.safetensors"
    assert text == f"saved eri/my_lora_000002.safetensors (step 2, {size:.1f} KB)", "name, step and size"
    kept = (loras / first).read_bytes(), (loras / first).with_suffix(".eri-state").read_bytes()
    second, text = save_node(trained_state(step=2, seed=2, run_id="2" * 32))
    assert second == "eri/my_lora_v2_000002.safetensors"
    assert text == (f"saved eri/my_lora_v2_000002.safetensors (step 2, {size:.1f} KB)\nmodels/loras/eri/my_lora_* hold another "
                    "training run's saves: this run saves as models/loras/eri/my_lora_v2_*")
    assert ((loras / first).read_bytes(), (loras / first).with_suffix(".eri-state").read_bytes()) == kept
    # the same run saving again overwrites its own save, under whichever prefix it has
    assert save_node(trained_state(step=2, seed=3, run_id="1" * 32))[0] == first
    assert save_node(trained_state(step=4, seed=3, run_id="2" * 32))[0] == "eri/my_lora_v2_000004.safetensors"
    assert save_node(trained_state(step=2, seed=4, run_id="3" * 32))[0] == "eri/my_lora_v3_000002.safetensors"
    # an adapter that no run trained (Create adapter, an older file) is a run of its own when saved
    assert save_node(trained_state(step=2, seed=4, run_id=None))[0] == "eri/my_lora_v4_000002.safetensors"
    assert load_node(second).run_id == "2" * 32


def test_saves_of_an_older_version_without_a_run_id_are_not_overwritten(comfy_folders):
    first, _ = save_node(trained_state(step=2, seed=1, run_id=None))
    rewrite(comfy_folders["loras"] / first, lambda t, m: m.pop("eri.run_id"))
    assert save_node(trained_state(step=2, seed=2, run_id="2" * 32))[0] == "eri/my_lora_v2_000002.safetensors"


def test_train_steps_saves_one_run_under_one_prefix_and_another_run_under_v2(comfy_folders, tiny, caplog):
    from eridiffusion.nodes.train import EriTrainSteps
    from helpers import settings
    p = prepared(comfy_folders, tiny)

    def train(adapter, steps, **kw):
        return run(EriTrainSteps, model=p["model"], adapter=adapter, latents=p["latents"], captions=p["captions"],
                   settings=settings(), steps=steps, save_every=2, keep_last=0, save_prefix="ckpt/run", **kw)[1]
    first = train(p["adapter"], 4)
    folder = comfy_folders["loras"] / "ckpt"
    saved = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    with caplog.at_level(logging.WARNING):
        second = train(p["adapter"], 4)        # the same new adapter, trained again: another run
    assert first.run_id and second.run_id and first.run_id != second.run_id
    assert "models/loras/ckpt/run_* hold another training run's saves: this run saves as " \
           "models/loras/ckpt/run_v2_*" in caplog.text
    assert {n: (folder / n).read_bytes() for n in saved} == saved
    assert sorted(set(os.listdir(folder)) - set(saved)) == [
        "run_v2_000002.eri-state", "run_v2_000002.safetensors", "run_v2_000004.eri-state",
        "run_v2_000004.safetensors"]
    # resuming the first run continues its own series
    resumed = load_node("ckpt/run_000004.safetensors")
    assert resumed.run_id == first.run_id
    continued = train(resumed, 2)
    assert continued.run_id == first.run_id
    assert (folder / "run_000006.safetensors").is_file() and not (folder / "run_v3_000006.safetensors").exists()


# ----------------------------------------------------------------------------------- file name lengths
def test_a_prefix_as_long_as_a_file_name_may_be_saves(comfy_folders):
    # 236 characters + _000002.safetensors = 255 bytes; the temporary name used to add 14 more
    name, _ = save_node(trained_state(), "long/" + "n" * 236)
    assert (comfy_folders["loras"] / name).is_file() and load_node(name).step == 2


@pytest.mark.parametrize("prefix,problem", [
    ("long/" + "n" * 237, r"makes file names of 256 bytes .*file systems allow 255: shorten its last part by 1 "
                          r"byte or more"),
    ("eri/", r"ends with a folder separator"),
    ("eri/my\x00lora", r"contains the control character '\\x00'"),
    ("eri/my\nlora", r"contains the control character '\\n'"),
])
def test_a_prefix_that_cannot_make_a_file_name_is_refused_naming_the_input(comfy_folders, prefix, problem):
    with pytest.raises(ValueError, match=r"^filename_prefix '.*'( \(\d+ characters\))? " + problem):
        save_node(trained_state(), prefix)
    assert checkpoint.file_name_problem(prefix) is not None
    assert list(comfy_folders["loras"].iterdir()) == []
