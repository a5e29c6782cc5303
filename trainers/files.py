"""Files: atomic writes, adapter files ComfyUI's LoRA loader reads, and the training state beside them.

Only safetensors are read or written (never pickle); the training state is a safetensors file named
<adapter>.eri-state. Non-tensor state goes into the header's metadata as JSON. Every write goes to a temporary
name in the same folder, is fsynced and renamed over the target, so a crash or a full disk never leaves a
half-written file where a good one was. Files get the mode the process's umask gives (as `open` would), not
the owner-only mode of `tempfile.mkstemp`.

This module imports nothing of the pack (tests load it on its own in a child process they kill).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import time
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

# The state file is safetensors too, but named so that ComfyUI's LoRA lists (every *.safetensors under
# models/loras) do not offer it as a LoRA.
STATE_SUFFIX = ".eri-state"

# A temporary file is named `.eri-<12 hex of the target's name>-<8 random hex>.tmp`: 30 characters whatever
# the target's length, so any name the file system takes can be saved (mkstemp's `.<name>.XXXXXXXX.tmp` made
# names of 242-255 bytes fail), and a leftover can be told apart from the user's own files.
TEMPORARY = re.compile(r"\.eri-[0-9a-f]{12}-[0-9a-f]{8}\.tmp")
# what versions before the fixed-length names left behind (tempfile.mkstemp's names)
OLD_TEMPORARY = re.compile(r"\..+\.(safetensors|eri-state)\.[a-z0-9_]{8}\.tmp", re.DOTALL)
# A temporary file untouched this long belongs to a save that was killed (SIGKILL, power loss): a save in
# progress writes its files in one go and renames them within seconds.
LEFTOVER_AGE_S = 600.0

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors' own writer (save_file, which trainers/cache.py uses) reports a full disk as a SafetensorError,
# not an OSError: "Error while serializing: I/O error: No space left on device (os error 28)"
DISK_FULL_TEXTS = ("no space left on device", f"os error {errno.ENOSPC}", "disk quota exceeded",
                   f"os error {errno.EDQUOT}")


# Set before starting ComfyUI on a single-user machine: paths in prompts may then leave ComfyUI's folders, and
# links in them may lead out (nodes/paths.py, trainers/data.py).
ALLOW_ANY_PATH_ENV = "ERI_ALLOW_ANY_PATH"


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes")


def inside(root: str, path: str) -> bool:
    """Whether `path`, with every symlink resolved, is `root` or lies under it (root resolved too)."""
    root_real = os.path.realpath(root)
    return os.path.commonpath([root_real, os.path.realpath(path)]) == root_real


def temporary_prefix(path: str) -> str:
    """The start of the names of `path`'s temporary files (the same for every save of that path)."""
    return ".eri-" + hashlib.sha1(os.path.basename(path).encode("utf-8", "surrogateescape")).hexdigest()[:12] + "-"


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    return isinstance(error, Exception) and any(t in text for t in DISK_FULL_TEXTS)


def disk_full_error(path: str, error: BaseException) -> OSError:
    """The documented message for a full disk (or quota) while saving `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = "the previous file is untouched" if os.path.exists(path) else "nothing was written"
    code = error.errno if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS else errno.ENOSPC
    return OSError(code, f"the disk is full while saving {path}: free space in {folder} or save elsewhere "
                         f"({kept})")


def remove_leftovers(folder: str, targets: Iterable[str] = (), older_than: float = LEFTOVER_AGE_S) -> list[str]:
    """Delete the temporary files that killed saves left in `folder`: those of `targets` (paths about to be
    saved again) whatever their age, and any other not written to for `older_than` seconds (younger ones may
    be another process's save in progress). Returns the paths removed."""
    own = tuple(temporary_prefix(t) for t in targets)
    old_own = tuple("." + os.path.basename(t) + "." for t in targets)
    now = time.time()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (TEMPORARY.fullmatch(name) or OLD_TEMPORARY.fullmatch(name)):
            continue
        try:
            if not (name.startswith(own) or name.startswith(old_own)
                    or now - entry.stat(follow_symlinks=False).st_mtime > older_than):
                continue
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:    # gone already, or not ours to delete: never a reason for a save to fail
            pass
    return removed


# Folders whose leftovers this process has looked for. A write looks once per folder, not before every write
# (listing a cache folder of 10k latents takes ~6 ms, as long as writing one): the latent cache writes thousands
# of files into one folder. checkpoint.save_adapter, which writes rarely, clears its own files' leftovers at
# every save.
_swept: set[str] = set()


class Staged:
    """A file written completely (and fsynced) under a temporary name beside `path`, not yet in its place."""

    def __init__(self, path: str, temporary: str):
        self.path, self.temporary = path, temporary

    def discard(self) -> None:
        try:
            os.unlink(self.temporary)
        except FileNotFoundError:
            pass


def stage(path: str, write: Callable[[str], None]) -> Staged:
    """Run `write(temporary_path)` for `path` and fsync the result; `commit` puts it in place. A full disk
    raises the documented OSError naming `path`; on any error the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if folder not in _swept:
        _swept.add(folder)
        remove_leftovers(folder)
    while True:
        temporary = os.path.join(folder, temporary_prefix(path) + secrets.token_hex(4) + ".tmp")
        try:
            # 0o666 less the umask, as open() would create it; O_EXCL never takes over another writer's file
            fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(path, e) from e
            raise
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    staged = Staged(path, temporary)
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            # safetensors' save_file puts a file of its own (mode 0600) in the temporary's place
            if os.fstat(f.fileno()).st_mode & 0o777 != mode:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
    except BaseException as e:
        staged.discard()
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    return staged


def commit(*staged: Staged) -> None:
    """Rename staged files over their targets, in the order given, and make the renames durable. If a rename
    fails, the files not yet renamed are discarded."""
    for index, item in enumerate(staged):
        try:
            os.replace(item.temporary, item.path)
        except BaseException:
            for rest in staged[index:]:
                rest.discard()
            raise
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(s.path)) for s in staged):
        try:   # make the renames themselves durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary_path)`, then the result replaces `path` in one rename: `path` is the old file or the
    complete new one, never a part. A full disk raises OSError "the disk is full while saving <path>: ..."."""
    commit(stage(path, write))


def write_file(path: str, data: bytes) -> None:
    """Write bytes with Python's I/O, so a full disk is an OSError with its errno."""
    with open(path, "wb") as f:
        f.write(data)


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes."""
    return serialize({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def stage_bytes(path: str, data: bytes) -> Staged:
    return stage(path, lambda p: write_file(p, data))


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    commit(stage_bytes(path, tensor_bytes(tensors, metadata)))


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.endswith((".safetensors", STATE_SUFFIX)):
        raise ValueError(f"{os.path.basename(path)!r} is not a .safetensors file; only safetensors are loaded")
    tensors = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_path_for(adapter_path: str) -> str:
    return adapter_path[: -len(".safetensors")] + STATE_SUFFIX


def json_meta(values: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
