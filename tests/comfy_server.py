"""A real ComfyUI server on loopback with this pack in its custom_nodes (distri_core.comfyui), and
process helpers for the tests that stop it."""

from __future__ import annotations

import time

from distri_core.comfyui import ComfyServer  # noqa: F401  (the tests' server is the pack's own)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def still_alive(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` seconds for `pids` to end; the ones still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]
