"""Files: atomic writes, adapter files ComfyUI's LoRA loader reads, and the training state beside them.

Only safetensors are read or written (never pickle); the training state is a safetensors file named
<adapter>.eri-state. Non-tensor state goes into the header's metadata as
JSON. Every write goes to a temporary name in the same folder, is fsynced and renamed over the target, so
a crash or a full disk never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The state file is safetensors too, but named so that ComfyUI's LoRA lists (every *.safetensors under
# models/loras) do not offer it as a LoRA.
STATE_SUFFIX = ".eri-state"


def inside(root: str, path: str) -> bool:
    """Whether `path`, with every symlink resolved, is `root` or lies under it (root resolved too)."""
    root_real = os.path.realpath(root)
    return os.path.commonpath([root_real, os.path.realpath(path)]) == root_real


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous file is untouched" if os.path.exists(path) else "nothing was written"
            raise OSError(e.errno, f"the disk is full while saving {path}: free space in {folder} or save "
                                   f"elsewhere ({kept})") from e
        raise
    try:   # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(prepared, p, metadata=metadata))


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.endswith((".safetensors", STATE_SUFFIX)):
        raise ValueError(f"{os.path.basename(path)!r} is not a .safetensors file; only safetensors are loaded")
    tensors = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


def state_path_for(adapter_path: str) -> str:
    return adapter_path[: -len(".safetensors")] + STATE_SUFFIX


def json_meta(values: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
