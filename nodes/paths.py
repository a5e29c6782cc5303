"""Where the pack may read and write: inside ComfyUI's input / models / output folders only.

A prompt can come from anyone who reaches the server, so a folder or file name from a prompt is resolved
(symlinks included) and must stay inside its ComfyUI folder. Setting the environment variable
ERI_ALLOW_ANY_PATH=1 before starting ComfyUI lifts this for single-user machines.
"""
from __future__ import annotations

import os
import uuid

import folder_paths

from ..trainers import checkpoint, data, files
from ..trainers.config import quoted

ALLOW_ANY_PATH_ENV, any_path_allowed = files.ALLOW_ANY_PATH_ENV, files.any_path_allowed


class PathError(ValueError):
    pass


def contained(base: str, name: str, input_name: str) -> str:
    """`name` resolved under `base`; raises PathError naming the input if it leaves `base`."""
    if not name or not name.strip():
        raise PathError(f"{input_name} is empty: give a folder name under {base}")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise PathError(f"{input_name} {quoted(name)} contains control characters (such as NUL or a line break): "
                        f"use a plain file or folder name")
    if os.path.isabs(name) and any_path_allowed():
        return os.path.realpath(name)
    base_real = os.path.realpath(base)
    resolved = os.path.realpath(os.path.join(base_real, name))
    if os.path.commonpath([base_real, resolved]) != base_real:
        raise PathError(f"{input_name} {quoted(name)} points outside {base_real}. Use a path inside that folder, "
                        f"or start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow any path")
    return resolved


# The longest tail save_samples adds to a sample's prefix: _step<7>_seed<10>_p<3>_<5>_.png
SAMPLE_NAME_TAIL = len("_step0000000_seed4294967295_p000_00000_.png")
NAME_MAX = 255


def output_prefix(prefix: str, input_name: str = "filename_prefix") -> str:
    """Where files named `<prefix>...` go under ComfyUI's output folder (symlinks resolved: ComfyUI's own
    check does not resolve them); raises PathError naming the input if they would leave it or their names
    would be too long for the file system."""
    folder = contained(folder_paths.get_output_directory(), os.path.dirname(os.path.normpath(prefix)) or ".",
                       input_name)
    _check_sample_name(prefix, input_name)
    return os.path.join(folder, os.path.basename(os.path.normpath(prefix)))


def _check_sample_name(prefix: str, input_name: str) -> None:
    """The prefix's last part, with what save_samples appends, must make a file name (an adapter's prefix is
    checked by checkpoint.file_name_problem)."""
    tail = SAMPLE_NAME_TAIL
    name = os.path.basename(os.path.normpath(prefix))
    if not name or name in (".", "..") or prefix.endswith(("/", os.sep)):
        raise PathError(f"{input_name} {quoted(prefix)} has no file name part: end it with a name, e.g. eri/my_lora")
    if len(name.encode()) + tail > NAME_MAX:
        raise PathError(f"{input_name}: its file name part is {len(name.encode())} bytes long; file names here "
                        f"are at most {NAME_MAX} bytes with the {tail} this pack appends: shorten it to "
                        f"{NAME_MAX - tail} or less")


def input_folder(name: str, input_name: str = "folder") -> str:
    return contained(folder_paths.get_input_directory(), name, input_name)


def loras_folder() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def lora_to_load(name: str, input_name: str = "lora_name") -> str:
    """The path of a file of ComfyUI's loras list, and of the training state beside it, both resolved inside
    one of the loras folders (a link in them may point anywhere)."""
    path = folder_paths.get_full_path_or_raise("loras", name)
    if any_path_allowed():
        return path
    folders = [os.path.realpath(f) for f in folder_paths.get_folder_paths("loras")]
    for file in (path, files.state_path_for(path)):
        if os.path.lexists(file) and not any(files.inside(folder, file) for folder in folders):
            raise PathError(f"{input_name} {quoted(name)}: {quoted(os.path.basename(file))} is a link to a file "
                            f"outside the loras folders, and only files inside them are read. Copy the file into "
                            f"models/loras, or start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow links that lead out")
    return path


def lora_file(prefix: str, step: int, input_name: str = "filename_prefix") -> str:
    return contained(loras_folder(), f"{prefix}_{step:06d}.safetensors", input_name)


def lora_prefix(prefix: str, input_name: str = "filename_prefix", step: int = 0) -> str:
    """Checks a save prefix under models/loras (inside the folder, a usable file name up to `step`) as Queue
    can; returns the path of its file at `step`."""
    problem = checkpoint.file_name_problem(prefix, step)
    if problem:
        raise PathError(f"{input_name} {quoted(prefix)} {problem}")
    return lora_file(prefix, step, input_name)


def lora_series(state, prefix: str, input_name: str, last_step: int):
    """(state with a run id, the prefix its saves go under, a note when that is not `prefix`): saves of another
    training run under `prefix` are kept, and this run's go to <prefix>_v2 (_v3, ...) instead."""
    lora_prefix(prefix, input_name, last_step)
    if state.run_id is None:    # not trained by this pack since it was created or loaded: a run of its own
        state = state.replace(run_id=uuid.uuid4().hex)
    prefix, note = checkpoint.prefix_for_run(prefix, state.run_id, lambda p, step: lora_file(p, step, input_name),
                                             where="models/loras/", step=last_step)
    return state, prefix, note


def existing_input_folder(name: str, input_name: str = "folder") -> str:
    folder = input_folder(name, input_name)
    if not os.path.isdir(folder):
        raise PathError(f"{input_name} {quoted(name)} does not exist in ComfyUI's input folder (looked for "
                        f"{folder}): create it and put the training images in it")
    return folder


def input_folder_with_images(name: str, input_name: str = "folder") -> str:
    folder = existing_input_folder(name, input_name)
    if not data.has_image_files(folder):
        raise PathError(f"{input_name} {quoted(name)} has no images ({', '.join(data.IMAGE_EXTENSIONS)}): put the "
                        f"training images (and a .txt caption beside each, if you have them) in {folder}")
    return folder


def control_folder(folder: str, name: str, input_name: str = "control_folder") -> str:
    """The control images' folder (edit pairs) of training folder `folder`, checked as Queue can: inside the input
    folder, existing, not the training folder, and holding an image of the same name for every training image."""
    control = input_folder(name, input_name)
    if not os.path.isdir(control):
        raise PathError(f"{input_name} {quoted(name)} does not exist in ComfyUI's input folder (looked for "
                        f"{control}): create it with a control image of the same name for each training image, "
                        f"or clear {input_name}")
    root = input_folder(folder)
    if os.path.realpath(control) == os.path.realpath(root):
        raise PathError(f"{input_name} {quoted(name)} is the training folder itself: each image would be its own "
                        f"control. Put the control images in a folder of their own")
    missing = data.unpaired_images(root, control)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(quoted(m) for m in missing[:3]) + more
        raise PathError(f"{input_name} {quoted(name)} has no control image for {len(missing)} training image(s) of "
                        f"folder {quoted(folder)}: {shown}. Add an image of the same name (any image extension) "
                        f"to {control} for each, or clear {input_name}")
    return control


def cache_folder(kind: str) -> str:
    root = os.environ.get("ERI_CACHE_DIR") or os.path.join(folder_paths.get_user_directory(), "eridiffusion", "cache")
    return os.path.join(root, kind)
