"""Saves never leave a broken file where a good one was: atomic writes, a full disk, a killed process."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion.trainers import files


def test_a_full_disk_during_a_save_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = str(tmp_path / "lora.safetensors")
    files.save_tensors(path, {"w": torch.ones(3)}, {})

    def fill_the_disk(p, data):
        with open(p, "wb") as f:
            f.write(data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "write_file", fill_the_disk)
    with pytest.raises(OSError, match=r"the disk is full while saving .*lora.safetensors.*the previous file is "
                                      r"untouched"):
        files.save_tensors(path, {"w": torch.zeros(3)}, {})
    assert torch.equal(load_file(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["lora.safetensors"], "no temporary file is left behind"


def test_a_process_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import eridiffusion_files as files

        def write_half_then_die(p, data):
            with open(p, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        files.write_file = write_half_then_die
        files.save_tensors({str(path)!r}, {{"w": torch.zeros(1000)}}, {{}})
    """)
    # the module under test, importable without the pack's package around it
    (tmp_path / "eridiffusion_files.py").write_text(open(files.__file__).read())
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert torch.equal(load_file(str(path))["w"], torch.ones(1000))
