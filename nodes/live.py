"""What the canvas sees of a Train steps node: a websocket event per step and one when the run changes state,
the samples as they are made, and the run's history kept here so a reloaded page (or another tab) can draw
the whole chart and show the samples again.

    eridiffusion.step   {node, workflow, prompt_id, step, total, loss, lr, it_per_s, eta_s, elapsed_s[, val_loss]}
                        val_loss: the held-out set's loss, on the steps it is evaluated
    eridiffusion.run    {node, workflow, prompt_id, state, step, total, elapsed_s, saved, error}
                        state: running | finished | cancelled | failed
    executed            ComfyUI's own message: the node's sample images so far (the canvas shows them)
    GET /eridiffusion/history                                 [history, ...] of every run kept, newest last
    GET /eridiffusion/history/<node id>?workflow=<workflow>   the latest run of that node of that workflow
                                                              (404 if none since the server started)

A run belongs to its prompt and to the workflow it was queued from (the `id` the frontend writes into the
workflow it sends with the prompt; "" for prompts queued without one, as from a script): two workflows whose
Train steps nodes share a node id keep separate charts. A history holds the adapter's earlier steps too (a
chained Train steps node draws the whole curve, and `first_step` marks where this node began). Long runs are
thinned: past MAX_POINTS points every other one is dropped and later steps are kept at the new stride. At most
MAX_RUNS histories are kept (anyone who reaches the server can queue prompts under new workflow ids), the
least recently updated dropped first.
Everything here is a no-op without a running PromptServer (in-process tests, scripts).
"""
from __future__ import annotations

import re
import threading
import time

STEP_EVENT = "eridiffusion.step"
RUN_EVENT = "eridiffusion.run"
MAX_POINTS = 4000
MAX_RUNS = 64
MAX_ERROR_CHARS = 300
# The frontend's workflow ids are UUIDs; anything else (a hand-written prompt) counts as no workflow.
_WORKFLOW_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"

_lock = threading.Lock()
_histories: dict[tuple[str, str], dict] = {}   # (workflow, node) -> history, least recently updated first


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _prompt_id(server) -> str | None:
    return getattr(server, "last_prompt_id", None) if server is not None else None


def workflow_id(extra_pnginfo) -> str:
    """The id of the workflow a prompt was queued from ("" when it came without one, or with a malformed one)."""
    workflow = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    wid = workflow.get("id") if isinstance(workflow, dict) else None
    return wid if isinstance(wid, str) and _WORKFLOW_ID.fullmatch(wid) else ""


def first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 1] + "…"


def _touch(key, history) -> None:
    """Store `history` as the most recently updated, dropping the oldest past MAX_RUNS (under _lock)."""
    _histories.pop(key, None)
    _histories[key] = history
    while len(_histories) > MAX_RUNS:
        del _histories[next(iter(_histories))]


class LiveRun:
    """One Train steps execution as the canvas follows it."""

    def __init__(self, node_id, prior, first_step: int, total: int, workflow: str = ""):
        self.node_id = None if node_id is None else str(node_id)
        self.workflow = workflow
        self.server = _server()
        self.prompt_id = _prompt_id(self.server)
        self.first_step, self.total, self.step_reached = first_step, total, first_step
        self.started = time.perf_counter()
        self.images: list[dict] = []
        if self.node_id is not None:
            steps, losses, lrs = list(prior.steps), list(prior.losses), list(prior.learning_rates)
            val_steps, val_losses = list(prior.val_steps), list(prior.val_losses)
            stride = 1
            while len(steps) > MAX_POINTS:
                steps, losses, lrs, stride = steps[::2], losses[::2], lrs[::2], stride * 2
            while len(val_steps) > MAX_POINTS:
                val_steps, val_losses = val_steps[::2], val_losses[::2]
            with _lock:
                _touch(self._key, {
                    "node": self.node_id, "workflow": workflow, "prompt_id": self.prompt_id,
                    "first_step": first_step, "total": total, "steps": steps, "losses": losses, "lrs": lrs,
                    "val_steps": val_steps, "val_losses": val_losses, "stride": stride, "state": RUNNING,
                    "running": True, "it_per_s": 0.0, "eta_s": None,
                    "elapsed_s": 0.0, "saved": None, "error": None, "images": []})
        self._send(RUN_EVENT, self._run_event(RUNNING))

    @property
    def _key(self):
        return (self.workflow, self.node_id)

    def _mine(self) -> dict | None:
        """This run's history (under _lock); None once a newer run of the node replaced it."""
        h = _histories.get(self._key)
        return h if h is not None and h["prompt_id"] == self.prompt_id else None

    def _send(self, event: str, data: dict) -> None:
        if self.server is not None and self.node_id is not None:
            self.server.send_sync(event, data, self.server.client_id)

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _run_event(self, state: str, saved: str | None = None, error: str | None = None) -> dict:
        return {"node": self.node_id, "workflow": self.workflow, "prompt_id": self.prompt_id, "state": state,
                "step": self.step_reached, "total": self.total, "elapsed_s": self._elapsed(), "saved": saved,
                "error": error}

    def step(self, report) -> dict:
        self.step_reached = report.step
        done = report.step - self.first_step
        elapsed = self._elapsed()
        rate = done / elapsed if elapsed > 0 else 0.0
        event = {"node": self.node_id, "workflow": self.workflow, "prompt_id": self.prompt_id,
                 "step": report.step, "total": report.total, "loss": report.loss, "lr": report.learning_rate,
                 "it_per_s": rate, "eta_s": (report.total - report.step) / rate if rate > 0 else None,
                 "elapsed_s": elapsed}
        val_loss = getattr(report, "val_loss", None)
        if val_loss is not None:
            event["val_loss"] = val_loss
        if self.node_id is not None:
            with _lock:
                h = self._mine()
                if h is not None:
                    if report.step % h["stride"] == 0 or report.step == report.total:
                        h["steps"].append(report.step)
                        h["losses"].append(report.loss)
                        h["lrs"].append(report.learning_rate)
                    if len(h["steps"]) > MAX_POINTS:
                        for key in ("steps", "losses", "lrs"):
                            h[key] = h[key][::2]
                        h["stride"] *= 2
                    if val_loss is not None:
                        h["val_steps"].append(report.step)
                        h["val_losses"].append(val_loss)
                        if len(h["val_steps"]) > MAX_POINTS:
                            h["val_steps"], h["val_losses"] = h["val_steps"][::2], h["val_losses"][::2]
                    h.update(total=report.total, it_per_s=rate, eta_s=event["eta_s"], elapsed_s=elapsed)
                    _touch(self._key, h)
        self._send(STEP_EVENT, event)
        return event

    def images_saved(self, results: list[dict]) -> None:
        """Show the samples made so far on the node, as ComfyUI shows a finished node's images."""
        self.images += results
        if self.node_id is not None:
            with _lock:
                h = self._mine()
                if h is not None:
                    h["images"] = list(self.images)
        self._send("executed", {"node": self.node_id, "display_node": self.node_id,
                                "output": {"images": list(self.images)}, "prompt_id": self.prompt_id})

    def finish(self, state: str = FINISHED, saved: str | None = None, error: str | None = None) -> None:
        """The run ended: finished, cancelled or failed (with the error's first line); `saved` is the adapter
        file written when it stopped, relative to the loras folder, if any."""
        event = self._run_event(state, saved, error)
        if self.node_id is not None:
            with _lock:
                h = self._mine()
                if h is not None:
                    h.update(state=state, running=False, eta_s=0.0 if state == FINISHED else None,
                             elapsed_s=event["elapsed_s"], saved=saved, error=error, stopped_step=self.step_reached)
        self._send(RUN_EVENT, event)


def _copy(h: dict) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in h.items()}


def history(node_id, workflow: str = "") -> dict | None:
    with _lock:
        h = _histories.get((workflow, str(node_id)))
        return None if h is None else _copy(h)


def histories() -> list[dict]:
    with _lock:
        return [_copy(h) for h in _histories.values()]


def _register_routes() -> None:
    server = _server()
    if server is None or getattr(server, "_eridiffusion_routes", False):
        return
    from aiohttp import web

    @server.routes.get("/eridiffusion/history")
    async def all_histories(request):
        return web.json_response(histories())

    @server.routes.get("/eridiffusion/history/{node_id}")
    async def one_history(request):
        h = history(request.match_info["node_id"], request.query.get("workflow", ""))
        if h is None:
            return web.json_response({"error": "no training run of this node of this workflow since the server "
                                               "started"}, status=404)
        return web.json_response(h)

    server._eridiffusion_routes = True


_register_routes()
