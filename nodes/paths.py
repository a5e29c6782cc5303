"""Where the pack may read and write: inside ComfyUI's input / models / output folders only.

A prompt can come from anyone who reaches the server, so a folder or file name from a prompt is resolved
(symlinks included) and must stay inside its ComfyUI folder. Setting the environment variable
ERI_ALLOW_ANY_PATH=1 before starting ComfyUI lifts this for single-user machines.
"""
from __future__ import annotations

import os

import folder_paths

ALLOW_ANY_PATH_ENV = "ERI_ALLOW_ANY_PATH"


class PathError(ValueError):
    pass


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes")


def contained(base: str, name: str, input_name: str) -> str:
    """`name` resolved under `base`; raises PathError naming the input if it leaves `base`."""
    if not name or not name.strip():
        raise PathError(f"{input_name} is empty: give a folder name under {base}")
    if os.path.isabs(name) and any_path_allowed():
        return os.path.realpath(name)
    base_real = os.path.realpath(base)
    resolved = os.path.realpath(os.path.join(base_real, name))
    if os.path.commonpath([base_real, resolved]) != base_real:
        raise PathError(f"{input_name} {name!r} points outside {base_real}. Use a path inside that folder, or "
                        f"start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow any path")
    return resolved


def input_folder(name: str, input_name: str = "folder") -> str:
    return contained(folder_paths.get_input_directory(), name, input_name)


def loras_folder() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def lora_file(prefix: str, step: int, input_name: str = "filename_prefix") -> str:
    return contained(loras_folder(), f"{prefix}_{step:06d}.safetensors", input_name)


def cache_folder(kind: str) -> str:
    root = os.environ.get("ERI_CACHE_DIR") or os.path.join(folder_paths.get_user_directory(), "eridiffusion", "cache")
    return os.path.join(root, kind)
