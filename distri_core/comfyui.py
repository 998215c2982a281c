"""A ComfyUI checkout as an outside program: where it is, and a server of it on loopback with
this pack in its custom_nodes, driven over HTTP. Nothing here imports ComfyUI; the tests, the GPU
acceptance check and users' scripts start the real thing through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .runtime.launch import free_port

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "distri-patch-parallel"
INSTALL_HINT = (
    "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout, or install one at ~/comfy/ComfyUI "
    "(git clone https://github.com/comfyanonymous/ComfyUI ~/comfy/ComfyUI, or `comfy install`) and "
    "install its requirements into this environment: pip install -r ~/comfy/ComfyUI/requirements.txt"
)


def find_comfyui() -> Path | None:
    """$COMFYUI_PATH, else ~/comfy/ComfyUI (comfy-cli's default), else the ComfyUI this pack is
    installed in (…/ComfyUI/custom_nodes/<pack>), if it holds a ComfyUI checkout."""
    candidates = [os.environ.get("COMFYUI_PATH"), str(Path.home() / "comfy" / "ComfyUI"),
                  str(PACK_ROOT.parent.parent) if PACK_ROOT.parent.name == "custom_nodes" else None]
    for p in candidates:
        if p and (Path(p) / "comfy" / "model_management.py").is_file():
            return Path(p)
    return None


# `python main.py`, with Ctrl-C working. Python raises KeyboardInterrupt on SIGINT only where SIGINT
# was not ignored when it started, and a job that a non-interactive shell starts in the background
# (CI, `nohup ... &`) inherits SIGINT ignored: ComfyUI then ignored Ctrl-C and stop() had to kill it
# (the 31 s teardown of full test runs; its hang report showed SigIgn with SIGHUP, SIGINT, SIGQUIT).
_LAUNCH = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv = sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')")


def hang_report(pid: int) -> str:
    """What a process that did not stop is doing (Linux /proc): its signal masks (is SIGINT
    ignored, blocked, caught?) and each thread's name, state and kernel wait channel."""
    lines = []
    try:
        with open(f"/proc/{pid}/status") as f:
            lines += [line.rstrip() for line in f if line.startswith(("State", "Threads", "SigBlk", "SigIgn", "SigCgt"))]
        for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
            try:
                name = (task / "comm").read_text().strip()
                state = (task / "stat").read_text().rsplit(")", 1)[-1].split()[0]
                lines.append(f"thread {task.name} {name}: {state} {(task / 'wchan').read_text().strip()}")
            except OSError:
                continue
    except OSError as e:
        lines.append(f"no report: {e}")
    return "\n".join(lines)


class ComfyServer:
    """`python main.py` of `comfy_root` on a free loopback port, with `base` as its base
    directory (models, input, output) and this pack linked into base/custom_nodes."""

    def __init__(self, comfy_root: Path, base: Path, extra_args: tuple[str, ...] = (), cpu: bool = True):
        self.base = Path(base)
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-c", _LAUNCH, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", str(self.base), "--disable-auto-launch", "--database-url",
               "sqlite:///:memory:", *extra_args]
        env = dict(os.environ, DO_NOT_TRACK="1", COMFY_NO_UPDATE_CHECK="1")
        self.proc = subprocess.Popen(cmd, cwd=comfy_root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.client_id = uuid.uuid4().hex
        self.stopped_by: str | None = None  # set by stop(): SIGINT, SIGABRT or SIGKILL

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            try:
                return self.get("/object_info")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start within {timeout} s; log:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                body = r.read()
                return json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt; log:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def images(self, entry: dict) -> list[Path]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                out.append(self.base / img.get("type", "output") / img.get("subfolder", "") / img["filename"])
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """Ctrl-C (SIGINT), as a user stops ComfyUI; a server still running after `timeout` seconds
        gets a report of why into its log (`hang_report`), then SIGABRT (ComfyUI's faulthandler
        writes the Python stack there too), then SIGKILL. `self.stopped_by` says which stopped it."""
        if self._log.closed:
            return
        if self.proc.poll() is not None:
            self.stopped_by = f"nothing: it had exited with {self.proc.returncode}"
        else:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
                self.stopped_by = "SIGINT"
            except subprocess.TimeoutExpired:
                self._log.write(f"\n--- not stopped {timeout:.0f} s after SIGINT ---\n{hang_report(self.proc.pid)}\n")
                self._log.flush()
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(5)
                    self.stopped_by = "SIGABRT"
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    self.stopped_by = "SIGKILL"
        self._log.close()
