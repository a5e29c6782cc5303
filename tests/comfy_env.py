"""Locating the real ComfyUI that scripts/setup provisioned, and importing this pack under a stable name."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "eridiffusion"


def comfyui_dir() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    marker = ROOT / ".comfyui" / "path"
    if marker.is_file():
        return Path(marker.read_text().strip())
    raise RuntimeError("ComfyUI is not set up: run scripts/setup (or scripts/test, which runs it)")


def import_comfyui_in_process() -> Path:
    """Make ComfyUI importable in this process, as a library (no server): on the CPU, or on the GPU with
    ERI_TEST_DEVICE=cuda (the tests marked gpu, run on a GPU machine)."""
    comfy_dir = comfyui_dir()
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    # must precede the first import of comfy.model_management
    comfy.cli_args.args.cpu = os.environ.get("ERI_TEST_DEVICE", "cpu") == "cpu"
    dynamic_vram = os.environ.get("ERI_TEST_DYNAMIC_VRAM") == "1" and not comfy.cli_args.args.cpu
    if dynamic_vram:
        import comfy_aimdo.control
        comfy_aimdo.control.init()     # as ComfyUI 0.33's main.py: before comfy.model_management touches CUDA
    import comfy.model_management  # noqa: F401
    if dynamic_vram:
        import comfy_aimdo.control
        if not comfy_aimdo.control.init_devices(d.index for d in comfy.model_management.get_all_torch_devices()):
            raise RuntimeError("ERI_TEST_DYNAMIC_VRAM=1 but comfy-aimdo did not start on this GPU")
    return comfy_dir


@contextlib.contextmanager
def dynamic_vram():
    """The rest of what ComfyUI 0.33's main.py does on an NVIDIA GPU unless --disable-dynamic-vram (after
    comfy-aimdo started, above): loaders make ModelPatcherDynamic MODELs. Only inside the block, because with it
    ComfyUI's layers are created without weights, to be assigned from a file: models built by the tests' own code
    (tiny_models) must be built outside it."""
    import comfy.memory_management
    import comfy.model_patcher
    saved = comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    try:
        yield
    finally:
        comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled = saved


def import_pack():
    """The repository root as package `eridiffusion` (ComfyUI imports it under its folder name)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
