"""What the canvas sees of a running Train steps node: a websocket event per step, the samples as they are
made, and the run's history kept here so a reloaded page (or a second browser) can draw the whole chart.

    eridiffusion.step            {node, prompt_id, step, total, loss, lr, it_per_s, eta_s}
    executed                     ComfyUI's own message: the node's sample images so far (the canvas shows them)
    GET /eridiffusion/history            {node id: history} of the latest run of every Train steps node
    GET /eridiffusion/history/<node id>  one of them (404 if that node never trained since the server started)

A history holds the adapter's earlier steps too (a chained Train steps node draws the whole curve). Long runs
are thinned: past MAX_POINTS points every other one is dropped and later steps are kept at the new stride.
Everything here is a no-op without a running PromptServer (in-process tests, scripts).
"""
from __future__ import annotations

import threading
import time

STEP_EVENT = "eridiffusion.step"
MAX_POINTS = 4000

_lock = threading.Lock()
_histories: dict[str, dict] = {}


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _prompt_id(server) -> str | None:
    return getattr(server, "last_prompt_id", None) if server is not None else None


class LiveRun:
    """One Train steps execution as the canvas follows it."""

    def __init__(self, node_id, prior, first_step: int, total: int):
        self.node_id = None if node_id is None else str(node_id)
        self.server = _server()
        self.prompt_id = _prompt_id(self.server)
        self.first_step, self.total = first_step, total
        self.started = time.perf_counter()
        self.images: list[dict] = []
        if self.node_id is not None:
            steps, losses, lrs = list(prior.steps), list(prior.losses), list(prior.learning_rates)
            stride = 1
            while len(steps) > MAX_POINTS:
                steps, losses, lrs, stride = steps[::2], losses[::2], lrs[::2], stride * 2
            with _lock:
                _histories[self.node_id] = {
                    "node": self.node_id, "prompt_id": self.prompt_id, "first_step": first_step, "total": total,
                    "steps": steps, "losses": losses, "lrs": lrs, "stride": stride, "running": True,
                    "it_per_s": 0.0, "eta_s": None, "images": []}

    def step(self, report) -> dict:
        done = report.step - self.first_step
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        event = {"node": self.node_id, "prompt_id": self.prompt_id, "step": report.step, "total": report.total,
                 "loss": report.loss, "lr": report.learning_rate, "it_per_s": rate,
                 "eta_s": (report.total - report.step) / rate if rate > 0 else None}
        if self.node_id is not None:
            with _lock:
                h = _histories.get(self.node_id)
                if h is not None and h["prompt_id"] == self.prompt_id:
                    if report.step % h["stride"] == 0 or report.step == report.total:
                        h["steps"].append(report.step)
                        h["losses"].append(report.loss)
                        h["lrs"].append(report.learning_rate)
                    if len(h["steps"]) > MAX_POINTS:
                        for key in ("steps", "losses", "lrs"):
                            h[key] = h[key][::2]
                        h["stride"] *= 2
                    h.update(total=report.total, it_per_s=rate, eta_s=event["eta_s"])
        if self.server is not None:
            self.server.send_sync(STEP_EVENT, event, self.server.client_id)
        return event

    def images_saved(self, results: list[dict]) -> None:
        """Show the samples saved so far on the node, as ComfyUI shows a finished node's images."""
        self.images += results
        if self.node_id is not None:
            with _lock:
                h = _histories.get(self.node_id)
                if h is not None and h["prompt_id"] == self.prompt_id:
                    h["images"] = list(self.images)
        if self.server is not None and self.node_id is not None:
            self.server.send_sync("executed", {"node": self.node_id, "display_node": self.node_id,
                                               "output": {"images": list(self.images)},
                                               "prompt_id": self.prompt_id}, self.server.client_id)

    def finish(self) -> None:
        if self.node_id is not None:
            with _lock:
                h = _histories.get(self.node_id)
                if h is not None and h["prompt_id"] == self.prompt_id:
                    h.update(running=False, eta_s=0.0)


def history(node_id) -> dict | None:
    with _lock:
        h = _histories.get(str(node_id))
        return None if h is None else {k: (list(v) if isinstance(v, list) else v) for k, v in h.items()}


def _register_routes() -> None:
    server = _server()
    if server is None or getattr(server, "_eridiffusion_routes", False):
        return
    from aiohttp import web

    @server.routes.get("/eridiffusion/history")
    async def all_histories(request):
        with _lock:
            ids = list(_histories)
        return web.json_response({i: history(i) for i in ids})

    @server.routes.get("/eridiffusion/history/{node_id}")
    async def one_history(request):
        h = history(request.match_info["node_id"])
        if h is None:
            return web.json_response({"error": "no training run of this node since the server started"},
                                     status=404)
        return web.json_response(h)

    server._eridiffusion_routes = True


_register_routes()
