"""distri-run: submit an API-format workflow to a running ComfyUI, follow its progress, save images.

    distri-run workflows/api/sdxl_txt2img_2048.json --server 127.0.0.1:8188 --out images/ \\
        --set 6.seed=42 --set 2.text="a red fox in snow"

Talks to ComfyUI's HTTP API only (`POST /prompt`, the `/ws` websocket, `/history`, `/view`), so
it runs anywhere, with or without torch. Progress comes from the websocket when the
`websocket-client` package is installed, else from polling `/history`. Exit code 0 on success,
1 if the prompt failed (the error is printed), 2 for bad arguments or an unreachable server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path


class ComfyClient:
    def __init__(self, server: str, timeout: float = 3600.0):
        self.base = server if server.startswith("http") else f"http://{server}"
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=60) as r:
            return r.read()

    def submit(self, prompt: dict) -> str:
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.base + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise PromptRejected(_rejection(e.read().decode(errors="replace"))) from None

    def wait(self, prompt_id: str, on_event: Callable[[str, dict], None] = lambda kind, data: None) -> dict:
        """Block until the prompt finishes; returns its history entry."""
        try:
            import websocket  # websocket-client
        except ImportError:
            websocket = None
        if websocket is not None:
            ws_url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            ws = websocket.create_connection(ws_url, timeout=self.timeout)
            try:
                # the prompt may have finished before we connected: history tells
                if self._finished(prompt_id) is None:
                    while True:
                        raw = ws.recv()
                        if not isinstance(raw, str):
                            continue  # binary preview frames
                        msg = json.loads(raw)
                        data = msg.get("data", {})
                        if data.get("prompt_id") not in (None, prompt_id):
                            continue
                        on_event(msg.get("type", ""), data)
                        if msg.get("type") in ("execution_error", "execution_interrupted"):
                            break
                        if msg.get("type") == "executing" and data.get("node") is None:
                            break
            finally:
                ws.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            entry = self._finished(prompt_id)
            if entry is not None:
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {self.timeout:.0f} s")

    def _finished(self, prompt_id: str) -> dict | None:
        history = json.loads(self._get(f"/history/{urllib.parse.quote(prompt_id)}"))
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and \
                entry["status"].get("status_str") in ("success", "error"):
            return entry
        return None

    def save_images(self, entry: dict, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                                "type": img.get("type", "output")})
                path = out_dir / img["filename"]
                path.write_bytes(self._get("/view?" + query))
                saved.append(path)
        return saved


class PromptRejected(RuntimeError):
    """ComfyUI refused the prompt (validation)."""


def _rejection(body: str) -> str:
    try:
        err = json.loads(body)
    except ValueError:
        return body
    lines = [err.get("error", {}).get("message", "prompt rejected")]
    for node, info in (err.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {node} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def apply_overrides(prompt: dict, overrides: list[str]) -> dict:
    """'node.input=value' (value parsed as JSON when it can be)."""
    for item in overrides:
        target, _, raw = item.partition("=")
        node, _, name = target.partition(".")
        if not raw or not name or node not in prompt:
            raise ValueError(f"--set {item!r}: use NODE_ID.INPUT=VALUE with a node id of this workflow "
                             f"({', '.join(sorted(prompt))})")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        prompt[node]["inputs"][name] = value
    return prompt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distri-run", description="Run an API-format ComfyUI workflow and save its images.")
    p.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/*.json)")
    p.add_argument("--server", default="127.0.0.1:8188", help="ComfyUI address (host:port or URL)")
    p.add_argument("--out", default="distri_output", help="folder for the images")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    try:
        prompt = apply_overrides(json.loads(Path(args.workflow).read_text()), args.set)
    except (OSError, ValueError) as e:
        print(f"distri-run: {e}", file=sys.stderr)
        return 2
    if "nodes" in prompt and "links" in prompt:
        print("distri-run: this is a UI-format workflow; use its API-format twin in workflows/api/", file=sys.stderr)
        return 2
    client = ComfyClient(args.server, args.timeout)

    def show(kind: str, data: dict) -> None:
        if kind == "progress":
            print(f"\rnode {data.get('node')}: step {data.get('value')}/{data.get('max')}", end="", file=sys.stderr)
        elif kind == "executing" and data.get("node"):
            print(f"\nrunning node {data['node']}", end="", file=sys.stderr)

    try:
        prompt_id = client.submit(prompt)
        entry = client.wait(prompt_id, show)
    except PromptRejected as e:
        print(f"distri-run: ComfyUI rejected the workflow:\n{e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        print(f"distri-run: cannot reach ComfyUI at {client.base}: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    status = entry["status"]
    if status.get("status_str") != "success":
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                print(f"distri-run: node {data.get('node_id')} ({data.get('node_type')}) failed: "
                      f"{data.get('exception_message', '').strip()}", file=sys.stderr)
        return 1
    for path in client.save_images(entry, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
