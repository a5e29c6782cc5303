"""A real ComfyUI server for a test session, and a small client that drives it as a script would."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import websocket

from comfy_env import ROOT, comfyui_dir

PACK_LINK_NAME = "comfyui-eridiffusion"
TEST_PACK = ROOT / "tests" / "eri_test_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`python main.py --cpu ...` on a free port with its own base directory; the pack and the test-only
    pack are linked into its custom_nodes. Use as a context manager: it is stopped even on failure."""

    def __init__(self, base_dir: Path, extra_packs: tuple[Path, ...] = (TEST_PACK,), env: dict | None = None):
        self.base = Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_packs = extra_packs
        self.env = env or {}
        self.process = None
        self.log_path = self.base / "server.log"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout: float = 180.0) -> None:
        for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        links = [(ROOT, PACK_LINK_NAME)] + [(p, p.name) for p in self.extra_packs]
        for target, name in links:
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", "--preview-method", "none"]
        # A frontend build other than the venv's comfyui_frontend_package (its static/ folder), to try a newer
        # frontend against this server without another venv.
        if os.environ.get("ERI_FRONTEND_ROOT"):
            cmd += ["--front-end-root", os.environ["ERI_FRONTEND_ROOT"]]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/EriTrainSteps", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ComfyClient:
    """POST /prompt, follow the websocket until the prompt finishes, read /history."""

    def __init__(self, url: str):
        self.url = url
        self.client_id = uuid.uuid4().hex

    def get_json(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def get_text(self, route: str) -> str:
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return r.read().decode("utf-8", errors="replace")

    def post_json(self, route: str, body: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {route} -> {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt as a script would (floats that are NaN or infinite written as Python's json writes
        them, which ComfyUI reads); (HTTP status, ComfyUI's answer), also when it refuses the prompt."""
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 600.0, on_event=None) -> "PromptResult":
        """Queue `prompt` and wait for it; `on_event(event)` sees every websocket message as it arrives."""
        ws = websocket.create_connection(self.url.replace("http", "ws") + f"/ws?clientId={self.client_id}",
                                         timeout=timeout)
        try:
            prompt_id = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
            events = []
            deadline = time.time() + timeout
            while time.time() < deadline:
                message = ws.recv()
                if not isinstance(message, str):
                    continue   # binary preview frames
                event = json.loads(message)
                events.append(event)
                if on_event:
                    on_event(event)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
        finally:
            ws.close()
        # The history entry is written after the websocket's last event: wait for it.
        history = {}
        while time.time() < deadline + 30:
            history = self.get_json(f"/history/{prompt_id}").get(prompt_id, {})
            if history.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.1)
        return PromptResult(prompt_id, events, history)


class PromptResult:
    def __init__(self, prompt_id, events, history):
        self.prompt_id, self.events, self.history = prompt_id, events, history

    @property
    def ok(self) -> bool:
        return any(e["type"] == "execution_success" for e in self.events)

    @property
    def error(self) -> dict | None:
        for e in self.events:
            if e["type"] == "execution_error":
                return e["data"]
        return None

    def events_of(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.events if e["type"] == kind]

    def outputs(self, node_id: str) -> dict:
        return self.history.get("outputs", {}).get(node_id, {})
