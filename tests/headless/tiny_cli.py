"""`python -m <pack> ...` as a user runs it, with one test-only change: ComfyUI's checkpoint loader is told
the sizes of the tiny text encoders (its own configs are full-size CLIP-L/G), as ComfyUI's te_model_options
allow. Usage: python tiny_cli.py PACK_PARENT PACK_NAME train job.yaml (also under torchrun)."""
import functools
import os
import runpy
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
from comfy_env import import_comfyui_in_process  # noqa: E402

import_comfyui_in_process()            # on the CPU

import comfy.sd  # noqa: E402
from eri_test_nodes.tiny_models import TINY_CLIP  # noqa: E402

comfy.sd.load_checkpoint_guess_config = functools.partial(
    comfy.sd.load_checkpoint_guess_config,
    te_model_options={"clip_l_model_config": dict(TINY_CLIP), "clip_g_model_config": dict(TINY_CLIP)})

parent, package, *args = sys.argv[1:]
sys.path.insert(0, parent)
sys.argv = [package, *args]
runpy.run_module(package, run_name="__main__", alter_sys=True)
