"""Fixtures: a real ComfyUI in-process (CPU) and a live ComfyUI server per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# On the CPU, Triton kernels (trainers/fused.py) run in Triton's interpreter; it must be chosen before Triton is
# imported. A GPU run (ERI_TEST_DEVICE=cuda) compiles them.
if os.environ.get("ERI_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_env import import_comfyui_in_process, import_pack  # noqa: E402
from conftest_images import write_images  # noqa: E402,F401

import_comfyui_in_process()
import_pack()


# ------------------------------------------------------------------------------------------------ in-process
@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """ComfyUI's input / output / temp / user / loras folders redirected to a fresh temporary tree."""
    import folder_paths
    dirs = {name: tmp_path / name for name in ("input", "output", "temp", "user", "loras", "cache")}
    for d in dirs.values():
        d.mkdir()
    saved = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory(), folder_paths.get_user_directory(),
             folder_paths.folder_names_and_paths["loras"])
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    folder_paths.folder_names_and_paths["loras"] = ([str(dirs["loras"])], folder_paths.supported_pt_extensions)
    monkeypatch.setenv("ERI_CACHE_DIR", str(dirs["cache"]))
    yield dirs
    folder_paths.set_input_directory(saved[0])
    folder_paths.set_output_directory(saved[1])
    folder_paths.set_temp_directory(saved[2])
    folder_paths.set_user_directory(saved[3])
    folder_paths.folder_names_and_paths["loras"] = saved[4]


@pytest.fixture
def tiny():
    """Tiny models built with ComfyUI's classes (see tests/eri_test_nodes/tiny_models.py)."""
    from eri_test_nodes import tiny_models
    return tiny_models


# ------------------------------------------------------------------------------------------------ live server
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from live_server import ComfyServer
    base = tmp_path_factory.mktemp("comfy_base")
    srv = ComfyServer(base)
    srv.start()
    yield srv
    srv.stop()
    artifacts = Path(os.environ.get("ERI_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
    artifacts.mkdir(exist_ok=True)
    (artifacts / "server.log").write_text(srv.log())


@pytest.fixture
def client(server):
    from live_server import ComfyClient
    return ComfyClient(server.url)
