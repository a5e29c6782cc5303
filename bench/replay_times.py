"""bench/train_bench.py with four more lines of output: the GPU time of each CUDA graph replay (events around
`CUDAGraph.replay`), the GPU time from each replay's end to the next one's start (the optimizer step's kernels and
the GPU idling), the host time from each step's one read of the device (the wait for its copy) to the next replay,
and the host time `replay()` itself takes. Same arguments as train_bench.py:

    python3 bench/replay_times.py --arch sdxl --variants gc --no-builtin --steps 20

A step's time beyond its replay is the optimizer's kernels plus the GPU idling while the host prepares the next
micro-batch (none when the next replay was queued before the read: train()'s step(ahead=True)) (a diagnosis of where the rest of a step goes; the s/step it prints is train_bench.py's own)."""
import atexit
import runpy
import sys
import time

import torch

_replay = torch.cuda.CUDAGraph.replay
events = []


host = {"synced": None, "gaps": [], "launch": []}
_synchronize = torch.cuda.Event.synchronize


def synchronize(self):     # the step's read (trainers/loop.py: DeviceRead)
    _synchronize(self)
    host["synced"] = time.perf_counter()


torch.cuda.Event.synchronize = synchronize


def replay(self):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    entered = time.perf_counter()
    if host["synced"] is not None:
        host["gaps"].append(entered - host["synced"])
    start.record()
    _replay(self)
    end.record()
    host["launch"].append(time.perf_counter() - entered)
    events.append((start, end))


torch.cuda.CUDAGraph.replay = replay


@atexit.register
def report():
    torch.cuda.synchronize()
    print("replay ms:", [round(s.elapsed_time(e), 1) for s, e in events])
    print("GPU ms from a replay's end to the next one's start:",
          [round(end.elapsed_time(start), 2) for (_, end), (start, _) in zip(events, events[1:])])
    print("host ms from the step's sync to the next replay:", [round(g * 1e3, 2) for g in host["gaps"]])
    print("host ms in graph.replay():", [round(g * 1e3, 2) for g in host["launch"]])


sys.argv = ["bench/train_bench.py"] + sys.argv[1:]
runpy.run_path("bench/train_bench.py", run_name="__main__")
