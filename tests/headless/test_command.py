"""`python -m <pack folder> train job.yaml`: a YAML job trained without a server, from a checkpoint file loaded
by ComfyUI's own loaders; and under torchrun, data parallel over processes (gloo, on the CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_env import ROOT, comfyui_dir
from conftest import write_images

TINY_CLI = Path(__file__).with_name("tiny_cli.py")
PACK = "comfyui-eridiffusion"     # the folder name users clone into (not an identifier: -m still imports it)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD3 checkpoint file (model, TAESD VAE, CLIP-L/G), images, and the pack under its folder name."""
    from eri_test_nodes import tiny_models as tiny
    base = tmp_path_factory.mktemp("headless")
    with torch.inference_mode(False):
        model, clip = tiny.tiny_model("sd3"), tiny.tiny_clip("sd3")
    sd = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in tiny.taesd_state_dict(16).items()})
    sd.update({f"text_encoders.{k}": v for k, v in clip.cond_stage_model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, base / "tiny_sd3.safetensors")
    write_images(base / "images", [(64, 64)] * 4)
    (base / "packs").mkdir()
    (base / "packs" / PACK).symlink_to(ROOT, target_is_directory=True)
    return base


def write_job(setup, name, folder, **train):
    """configs/sd35_lora.yaml made tiny: 64 px, the tiny checkpoint, fp32 on the CPU."""
    data = yaml.safe_load((ROOT / "configs" / "sd35_lora.yaml").read_text())
    p = data["config"]["process"][0]
    p.update(device="cpu", training_folder=str(folder))
    p["model"]["name_or_path"] = "tiny_sd3.safetensors"          # relative to the job file
    p["datasets"][0].update(folder_path="images", resolution=[64], caption_dropout_rate=0.25)
    p["train"].update(dict(steps=4, optimizer="adamw", dtype="fp32", gradient_checkpointing=False, lr=1e-3,
                           noise_offset=0.05), **train)
    p["save"].update(save_every=2, max_step_saves_to_keep=1)
    p["sample"].update(sample_every=2, width=64, height=64, sample_steps=2, prompts=["[trigger] in snow"])
    path = setup / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def command(setup, *args, torchrun=0, timeout=240):
    env = {**os.environ, "COMFYUI_PATH": str(comfyui_dir()), "ERI_CACHE_DIR": str(setup / "cache"),
           "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.run([*launcher, str(TINY_CLI), str(setup / "packs"), PACK, *args, "--no-progress"],
                          cwd=setup, env=env, capture_output=True, text=True, timeout=timeout)


def history(state_file: Path) -> list[float]:
    with safe_open(str(state_file), "pt") as f:
        return json.loads(f.metadata()["history"])["losses"]


def test_a_wrong_job_exits_2_naming_the_key_through_the_folder_name_module(setup):
    bad = setup / "bad.yaml"
    bad.write_text("config:\n  name: x\n  process:\n    - train: {stepz: 10}\n")
    result = subprocess.run([sys.executable, "-m", PACK, "train", str(bad)], cwd=setup / "packs",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "config.process[0].train.stepz" in result.stderr and "'steps'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_job_asking_for_a_gpu_this_machine_lacks_exits_2_and_a_failed_job_writes_nothing(setup):
    job = write_job(setup, "gpu_job", setup / "gpu_out")
    data = yaml.safe_load(job.read_text())
    data["config"]["process"][0].update(device="cuda:0")        # as every ai-toolkit example says
    job.write_text(yaml.safe_dump(data))

    def train(*args):
        return subprocess.run([sys.executable, "-m", PACK, "train", str(job), *args], cwd=setup / "packs",
                              env={**os.environ, "COMFYUI_PATH": str(comfyui_dir()), "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=120)
    result = train()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "config.process[0].device 'cuda:0'" in result.stderr and "no cuda device" in result.stderr
    assert "--device cpu" in result.stderr
    # --device cpu goes on: to the model-file check, which fails here; it leaves no job folder, no job.yaml
    data["config"]["process"][0]["model"]["name_or_path"] = "missing.safetensors"
    job.write_text(yaml.safe_dump(data))
    result = train("--device", "cpu")
    assert result.returncode == 2 and "model.name_or_path 'missing.safetensors' is not a file" in result.stderr
    assert not (setup / "gpu_out").exists()


@pytest.mark.slow
def test_train_saves_every_n_keeps_the_last_k_samples_and_resumes(setup):
    job = write_job(setup, "job", setup / "out")
    result = command(setup, "train", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = setup / "out" / "my_sd35_lora"
    adapters = sorted(p.name for p in folder.glob("*.safetensors"))
    assert adapters == ["my_sd35_lora_000004.safetensors"]          # step 2 saved, then dropped (keep 1)
    assert "my_sd35_lora_000002.safetensors" in result.stdout + result.stderr
    samples = sorted(p.name.split("_seed")[0] for p in (folder / "samples").glob("*.png"))
    assert samples == ["my_sd35_lora_step000000", "my_sd35_lora_step000002", "my_sd35_lora_step000004"]
    assert (folder / "job.yaml").read_text() == job.read_text()
    first = history(folder / "my_sd35_lora_000004.eri-state")
    assert len(first) == 4

    # The stock LoRA loader reads the file: every key maps onto the model's layers.
    keys = load_file(str(folder / "my_sd35_lora_000004.safetensors"))
    assert keys and all(k.startswith("lora_unet_") or k.startswith("diffusion_model.") for k in keys), list(keys)[:3]

    job.write_text(job.read_text().replace("steps: 4", "steps: 6"))
    result = command(setup, "train", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr and "step 4" in result.stderr
    resumed = history(folder / "my_sd35_lora_000006.eri-state")
    assert resumed[:4] == first and len(resumed) == 6
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["my_sd35_lora_000006.safetensors"]
    result = command(setup, "train", str(job))
    assert result.returncode == 0 and "already trained to step 6" in result.stdout


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_process_with_twice_the_batch(setup):
    one = write_job(setup, "one", setup / "one", batch_size=2, steps=3)
    two = write_job(setup, "two", setup / "two", batch_size=1, steps=3)
    for job in (one, two):
        data = yaml.safe_load(job.read_text())
        del data["config"]["process"][0]["sample"]
        job.write_text(yaml.safe_dump(data))
    single = command(setup, "train", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    double = command(setup, "train", str(two), torchrun=2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("trained to step 3") == 1           # rank 0 alone reports and writes

    a = load_file(str(setup / "one" / "my_sd35_lora" / "my_sd35_lora_000003.eri-state"))
    b = load_file(str(setup / "two" / "my_sd35_lora" / "my_sd35_lora_000003.eri-state"))
    assert history(setup / "two" / "my_sd35_lora" / "my_sd35_lora_000003.eri-state") == \
        pytest.approx(history(setup / "one" / "my_sd35_lora" / "my_sd35_lora_000003.eri-state"), rel=1e-5)
    assert torch.equal(a["rng"], b["rng"])                           # same draws: noise, timesteps, dropout
    weights = [k for k in a if k.startswith("weight.")]
    assert weights
    for k in weights:   # the same updates, up to the order of float sums (Adam's first steps are ±lr)
        assert (a[k] - b[k]).abs().max() <= 1e-3 * a[k].abs().max() + 1e-7, k


@pytest.mark.slow
def test_a_validation_dataset_is_held_out_and_its_loss_reported_every_n_steps(setup):
    write_images(setup / "held_out", [(64, 64)] * 2, seed=4, prefix="val")
    job = write_job(setup, "validated", setup / "validated", validate_every_n_steps=3, steps=4)
    data = yaml.safe_load(job.read_text())
    process = data["config"]["process"][0]
    del process["sample"]
    process["datasets"].append({"folder_path": "held_out", "resolution": [64], "validation": True})
    job.write_text(yaml.safe_dump(data))
    result = command(setup, "train", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    reported = [line for line in result.stdout.splitlines() if "validation loss" in line]
    assert [line.split(":")[0] for line in reported] == ["step 3", "step 4"], result.stdout
    with safe_open(str(setup / "validated" / "my_sd35_lora" / "my_sd35_lora_000004.eri-state"), "pt") as f:
        saved = json.loads(f.metadata()["history"])
    assert saved["val_steps"] == [3, 4] and [f"{v:.5f}" for v in saved["val_losses"]] == \
        [line.split()[-1] for line in reported]
    assert len(saved["losses"]) == 4


@pytest.mark.slow
def test_a_job_with_train_text_encoder_trains_and_saves_the_text_encoder_under_kohyas_keys(setup):
    job = write_job(setup, "te_job", setup / "te_out", train_text_encoder=True, text_encoder_lr=5e-4)
    result = command(setup, "train", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    keys = load_file(str(setup / "te_out" / "my_sd35_lora" / "my_sd35_lora_000004.safetensors"))
    assert {k[:9] for k in keys if k.startswith("lora_te")} == {"lora_te1_", "lora_te2_"}
    assert any(k.startswith("lora_te1_") and "lora_up" in k and keys[k].abs().max() > 0 for k in keys)
    assert "train_text_encoder" not in result.stderr, "not among the keys that have no effect"
