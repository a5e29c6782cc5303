"""Headless training of a YAML job (ai-toolkit's dialect), with ComfyUI as a library (no server):

    cd ComfyUI/custom_nodes
    python -m comfyui-eridiffusion train job.yaml                       # this pack's folder name
    torchrun --nproc_per_node 4 -m comfyui-eridiffusion train job.yaml  # data parallel on 4 GPUs

ComfyUI is found through COMFYUI_PATH, else as the folder above custom_nodes/, else the ComfyUI that
scripts/setup provisioned (.comfyui/path). Exit status: 0 trained (or already done), 1 training failed,
2 the job is wrong (the message names the key) or asks for a device this machine lacks (--device cpu
overrides it), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def comfyui_dir() -> str:
    if os.environ.get("COMFYUI_PATH"):
        return os.path.abspath(os.environ["COMFYUI_PATH"])
    parent = os.path.dirname(PACK_DIR)
    if os.path.basename(parent) == "custom_nodes" and os.path.isdir(os.path.join(parent, "..", "comfy")):
        return os.path.abspath(os.path.join(parent, ".."))
    marker = os.path.join(PACK_DIR, ".comfyui", "path")
    if os.path.isfile(marker):
        with open(marker) as f:
            return f.read().strip()
    raise SystemExit("ComfyUI not found: set COMFYUI_PATH to your ComfyUI folder, or run this from "
                     "ComfyUI/custom_nodes/")


def missing_device(device: str, asked_by: str) -> str | None:
    """Why this machine cannot train on `device`, or None. Asked before ComfyUI picks its device: without a
    driver, comfy.model_management fails on import with a traceback ("Found no NVIDIA driver")."""
    import torch
    kind, _, index = device.partition(":")
    count = {"cuda": lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "xpu": lambda: torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0,
             "mps": lambda: int(torch.backends.mps.is_available())}.get(kind)
    if count is None:
        return None
    found = count()
    if found > int(index or 0):
        return None
    has = f"{found} {kind} device{'s' if found != 1 else ''}" if found else f"no {kind} device"
    return (f"{asked_by} asks for {device}, but this machine has {has} (torch sees {has}): run on a machine that "
            f"has it, or add --device cpu to train on the CPU (slow), or --device {kind}:N for another device")


def import_comfyui(device: str) -> None:
    """Make ComfyUI importable and choose its device before comfy.model_management first loads."""
    path = comfyui_dir()
    if not os.path.isdir(os.path.join(path, "comfy")):
        raise SystemExit(f"{path} is not a ComfyUI folder (it has no comfy/); set COMFYUI_PATH")
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args
    if device == "cpu":
        comfy.cli_args.args.cpu = True
    elif device.startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            index = int(local) if local is not None else (int(device.split(":")[1]) if ":" in device else 0)
            torch.cuda.set_device(index)      # torchrun: one GPU per process
    import comfy.model_management  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eridiffusion", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a YAML job (resumes from the newest adapter in its folder)")
    train.add_argument("job", help="the job file (.yaml)")
    train.add_argument("--device", help="override the job's device: cpu, cuda, cuda:N (e.g. cpu on a machine "
                                        "without the job's GPU)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)

    from .trainers.config import ConfigError, quoted
    from .trainers.job import DEVICE, load_job
    try:
        job = load_job(args.job)         # a first read, before ComfyUI: to learn the device
        device = (args.device or job.device).strip().lower()
        if not DEVICE.fullmatch(device):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N (mps, xpu[:N]), got {quoted(args.device)}")
        problem = missing_device(device, "--device" if args.device else
                                 f"{job.source}: config.process[0].device {quoted(job.device)}")
        if problem:
            raise ConfigError(problem)
        import_comfyui(device)
        job = load_job(args.job)         # again with ComfyUI's sampler and scheduler names at hand
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .headless import run_job
    from .trainers import distributed
    from .trainers.loop import TrainingError
    world = distributed.init_from_env(device)
    try:
        run_job(job, world, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last finished step is saved; the next run resumes from it", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
