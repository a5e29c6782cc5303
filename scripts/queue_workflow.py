#!/usr/bin/env python3
"""Queue a saved API-format workflow on a running ComfyUI, follow it, and fetch what it made: the way to
train headless (on a server, over SSH, from a scheduler).

    python scripts/queue_workflow.py my_training_api.json --server http://127.0.0.1:8188 --out results/ \
        --set 7.steps=2000 --set 2.folder=my_images

Save the workflow with the frontend's "Export (API)" (the file /prompt takes; example_workflows/api/ has
ready ones). While it runs this prints each node as it starts, the training steps (step / total, loss,
learning rate, it/s, ETA, from the Train steps node's eridiffusion.step events; at most one line a second
per node, and the last step) and ComfyUI's progress of other nodes (samplers). When it finishes, every
image the workflow output (sample images, the loss graph, SaveImage / PreviewImage results) is downloaded
through /view into --out, and the adapters the Save adapter nodes wrote are named.

Exit status: 0 done, 1 the workflow failed (the error is printed), 2 ComfyUI refused the workflow,
130 interrupted (Ctrl-C also asks ComfyUI to stop this prompt). Standard library only: runs with any
Python 3.10+, not only ComfyUI's.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


# ------------------------------------------------------------------------------------- a minimal websocket
class WebSocket:
    """Client side of RFC 6455, enough for ComfyUI's /ws: text and binary messages, ping, close."""

    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        if parts.scheme == "wss":
            import ssl
            raw = socket.create_connection((parts.hostname, port), timeout=timeout)
            self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=parts.hostname)
        else:
            self.sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the websocket handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket refused: {head.decode(errors='replace').splitlines()[0]}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the websocket")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        length = len(payload)
        header = bytes([0x80 | opcode])
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", length)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        """The next message: str (text), bytes (binary), or None when the server closed."""
        message, kind = b"", None
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                return None
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                kind = opcode
            message += payload
            if first & 0x80:
                return message.decode("utf-8") if kind == 0x1 else message

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# ------------------------------------------------------------------------------------------------ HTTP
class Comfy:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def get(self, route: str) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=60) as r:
            return r.read()

    def post(self, route: str, body: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            raw = r.read()
            return json.loads(raw) if raw else None


# -------------------------------------------------------------------------------------------- workflow
def load_workflow(path: Path, settings: list[str]) -> dict:
    workflow = json.loads(path.read_text())
    if "nodes" in workflow and "links" in workflow:
        raise SystemExit(f"{path} is a UI workflow: save it with the frontend's \"Export (API)\" (or use the "
                         f"file of the same name in example_workflows/api/)")
    if not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise SystemExit(f"{path} is not an API-format workflow (node id -> {{class_type, inputs}})")
    for item in settings:
        match = re.fullmatch(r"([^.=]+)\.([^=]+)=(.*)", item, re.S)
        if not match:
            raise SystemExit(f"--set takes NODE_ID.INPUT=VALUE, got {item!r}")
        node, name, value = match.groups()
        if node not in workflow:
            raise SystemExit(f"--set {item}: the workflow has no node {node}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value          # a bare string: --set 2.folder=my_images
        workflow[node].setdefault("inputs", {})[name] = parsed
    return workflow


def format_eta(seconds) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, m, r = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{r:02d}s" if m else f"{r}s"


def describe_error(data: dict) -> str:
    lines = [f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
             f"{data.get('exception_message', '').strip()}"]
    return "\n".join(lines)


def describe_refusal(body: str) -> str:
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        return body
    lines = [answer.get("error", {}).get("message", "refused")]
    for node, info in (answer.get("node_errors") or {}).items():
        for error in info.get("errors", []):
            lines.append(f"  node {node} ({info.get('class_type')}): {error.get('message')}: {error.get('details')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def follow(comfy: Comfy, ws: WebSocket, prompt_id: str, workflow: dict, timeout: float) -> tuple[str, dict]:
    """Print progress until the prompt ends; returns (outcome, data of the last event)."""
    deadline = time.time() + timeout
    last_print: dict = {}
    training_nodes = set()
    while time.time() < deadline:
        message = ws.recv()
        if message is None:
            raise ConnectionError("the server closed the websocket")
        if not isinstance(message, str):
            continue                                # binary preview images
        event = json.loads(message)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        node = str(data.get("node")) if data.get("node") is not None else None
        class_type = workflow.get(node, {}).get("class_type", "?") if node else None
        if kind == "executing" and node:
            print(f"[node {node} {class_type}] running", flush=True)
        elif kind == "execution_cached" and data.get("nodes"):
            print(f"cached (not run again): nodes {', '.join(map(str, data['nodes']))}", flush=True)
        elif kind == "eridiffusion.step":
            training_nodes.add(node)
            now = time.time()
            if data["step"] == data["total"] or now - last_print.get(node, 0) >= 1.0:
                last_print[node] = now
                print(f"[node {node} {class_type}] step {data['step']}/{data['total']}  loss {data['loss']:.5f}  "
                      f"lr {data['lr']:.3g}  {data['it_per_s']:.2f} it/s  ETA {format_eta(data['eta_s'])}",
                      flush=True)
        elif kind == "progress" and node and node not in training_nodes:
            now = time.time()
            if data["value"] == data["max"] or now - last_print.get(node, 0) >= 1.0:
                last_print[node] = now
                print(f"[node {node} {class_type}] {data['value']}/{data['max']}", flush=True)
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            return kind, data
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")


def fetch_results(comfy: Comfy, prompt_id: str, workflow: dict, out: Path) -> None:
    history: dict = {}
    for _ in range(100):                            # the history is written just after the last event
        history = json.loads(comfy.get(f"/history/{prompt_id}")).get(prompt_id, {})
        if history.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.1)
    for node, outputs in sorted(history.get("outputs", {}).items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        class_type = workflow.get(node, {}).get("class_type", "?")
        # Train steps shows captioned previews of its samples and lists the sample files as "eri_samples"
        for image in outputs.get("eri_samples") or outputs.get("images", []):
            query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
            target = out / image.get("subfolder", "") / image["filename"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(comfy.get(f"/view?{query}"))
            print(f"image from node {node} ({class_type}): {target}", flush=True)
        for text in outputs.get("text", []):
            saved = re.match(r"saved (.+?) \(step (\d+)", str(text))
            if saved:
                print(f"adapter saved by node {node}: {saved.group(1)} (step {saved.group(2)}; in ComfyUI's "
                      f"models/loras, the .eri-state beside it resumes training)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON (\"Export (API)\")")
    parser.add_argument("--server", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                        help="ComfyUI's address (default $COMFYUI_URL or http://127.0.0.1:8188)")
    parser.add_argument("--out", type=Path, default=Path("comfy-results"),
                        help="folder for the downloaded images (default comfy-results/)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change an input before queueing (VALUE is JSON, or a plain string); repeatable")
    parser.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="give up after this many seconds")
    args = parser.parse_args(argv)

    workflow = load_workflow(args.workflow, args.settings)
    comfy = Comfy(args.server)
    client_id = uuid.uuid4().hex
    ws_url = comfy.url.replace("https://", "wss://").replace("http://", "ws://") + f"/ws?clientId={client_id}"
    ws = WebSocket(ws_url, timeout=args.timeout)
    try:
        try:
            prompt_id = comfy.post("/prompt", {"prompt": workflow, "client_id": client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            print(f"ComfyUI refused the workflow: {describe_refusal(e.read().decode(errors='replace'))}",
                  file=sys.stderr)
            return 2
        print(f"queued prompt {prompt_id} on {comfy.url}", flush=True)
        try:
            outcome, data = follow(comfy, ws, prompt_id, workflow, args.timeout)
        except KeyboardInterrupt:
            comfy.post("/interrupt", {"prompt_id": prompt_id})
            print("interrupted: asked ComfyUI to stop this prompt", file=sys.stderr)
            return 130
    finally:
        ws.close()
    if outcome == "execution_error":
        print(f"failed: {describe_error(data)}", file=sys.stderr)
        return 1
    if outcome == "execution_interrupted":
        print("interrupted on the server", file=sys.stderr)
        return 130
    fetch_results(comfy, prompt_id, workflow, args.out)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
