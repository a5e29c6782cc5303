"""Train a LoRA end to end through a real ComfyUI server on the CPU (see README: "Two commands").

ComfyUI's checkpoint loader only recognises full-size SDXL files, so the example workflow's loader is
swapped for the test-only node EriTestTinyModel, which builds a tiny SDXL, its text encoder and a TAESD
VAE with ComfyUI's own classes. Everything else is the workflow a user runs.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest_images import write_images  # noqa: E402
from live_server import ComfyClient, ComfyServer  # noqa: E402
from workflow_format import tiny_training_prompt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--out", default=str(ROOT / "demo-output"), help="where the server's folders go")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base = out / "comfyui"
    started = time.time()
    print(f"[demo] starting ComfyUI (CPU) with base directory {base}", flush=True)
    with ComfyServer(base) as server:
        sizes = [(64, 64), (64, 96), (96, 64), (64, 64), (80, 64), (64, 80), (64, 64), (96, 64)]
        write_images(base / "input" / "eri_demo", sizes)
        print(f"[demo] wrote {len(sizes)} captioned images to {base / 'input' / 'eri_demo'}", flush=True)
        api = json.loads((ROOT / "example_workflows" / "api" / "sdxl_lora.json").read_text())
        prompt = tiny_training_prompt(api, "eri_demo", steps=args.steps, prefix="eri/demo_lora")
        client = ComfyClient(server.url)

        def show(event):
            if event["type"] == "eridiffusion.step" and (event["data"]["step"] % 20 == 0):
                d = event["data"]
                print(f"[demo] step {d['step']}/{d['total']}  loss {d['loss']:.4f}  {d['it_per_s']:.1f} it/s",
                      flush=True)

        print(f"[demo] queueing example_workflows/sdxl_lora.json ({args.steps} steps) at {server.url}", flush=True)
        result = client.run(prompt, timeout=1200, on_event=show)
        if not result.ok:
            print(json.dumps(result.error, indent=1), "\n", server.log_tail(), file=sys.stderr)
            sys.exit(1)
        lora = base / "models" / "loras" / "eri" / f"demo_lora_{args.steps:06d}.safetensors"
        graph = result.outputs("9")["images"][0]
        plot = out / "loss.png"
        shutil.copy(base / graph["type"] / graph.get("subfolder", "") / graph["filename"], plot)
    print(f"[demo] done in {time.time() - started:.0f} s", flush=True)
    print(f"[demo] LoRA:        {lora}")
    print(f"[demo] train state: {lora.with_suffix('.eri-state')}")
    print(f"[demo] loss plot:   {plot}")


if __name__ == "__main__":
    main()
