"""Shared fixtures: a persistent 4-rank gloo cluster, and the real ComfyUI when present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import os  # noqa: E402
import tempfile  # noqa: E402

# mode auto caches machine profiles on disk: the tests (and the ComfyUI servers they start, which
# inherit the environment) use a directory of their own, never the user's ~/.cache.
_PROFILES = None if "DISTRI_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="distri-test-profiles-")
if _PROFILES:
    os.environ["DISTRI_CACHE_DIR"] = _PROFILES


def pytest_sessionfinish(session, exitstatus):
    if _PROFILES:
        import shutil

        shutil.rmtree(_PROFILES, ignore_errors=True)

from distri_core.comfyui import INSTALL_HINT as COMFY_HINT  # noqa: E402
from distri_core.comfyui import find_comfyui as comfy_path  # noqa: E402
from distri_core.runtime.launch import LocalCluster  # noqa: E402


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    path = comfy_path()
    if path is None:
        pytest.skip(COMFY_HINT)
    try:
        import comfy_models

        comfy_models.setup(str(path))
    except ImportError as e:
        pytest.skip(f"{COMFY_HINT} ({type(e).__name__}: {e})")
    return path


class ClusterHandle:
    """Starts the cluster on first use and again after a failure killed it."""

    def __init__(self, world: int):
        self.world = world
        self._cluster: LocalCluster | None = None

    def run(self, fn, *args, size: int, timeout: float = 600, **kwargs):
        if self._cluster is None:
            self._cluster = LocalCluster(self.world)
        try:
            return self._cluster.run(fn, *args, size=size, timeout=timeout, **kwargs)
        except (TimeoutError, RuntimeError) as e:
            if not self._cluster.alive:
                self._cluster = None
            raise e

    def close(self):
        if self._cluster is not None:
            self._cluster.close()


@pytest.fixture(scope="module")
def cluster():
    handle = ClusterHandle(4)
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def env(comfy_root):
    """The pack's nodes loaded into this process's real ComfyUI (see comfy_host.NodeEnv); the
    shared worker pool is stopped when the module's tests are done."""
    import comfy_host

    yield comfy_host.NodeEnv(str(comfy_root))
    from distri_core.runtime.pool import current_pool

    if current_pool() is not None:
        current_pool().close()


@pytest.fixture(scope="session")
def comfy_base(comfy_root, tmp_path_factory):
    """A ComfyUI base directory with random model files and input images."""
    import comfy_models
    import workflow_runs

    comfy_models.setup(str(comfy_root))
    base = tmp_path_factory.mktemp("comfy_base")
    workflow_runs.write_assets(base)
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_root, comfy_base):
    """A real ComfyUI server on loopback with this pack in its custom_nodes (shared by the
    headless and browser tests)."""
    from comfy_server import ComfyServer, still_alive

    server = ComfyServer(comfy_root, comfy_base)
    try:
        info = server.wait_ready()
        missing = {"DistriSampler", "DistriModel", "DistriPatchParallelConfig"} - set(info)
        assert not missing, f"the pack did not load: {missing}\n{server.log()[-3000:]}"
        yield server
        pids = [w["pid"] for w in server.get("/distri/status")["workers"]]
    finally:
        server.stop()
    # Ctrl-C stops it, even when the tests run as a background job, which inherits SIGINT ignored
    # (distri_core.comfyui._LAUNCH); otherwise stop() wrote why into the server's log.
    assert server.stopped_by == "SIGINT", (f"ComfyUI did not stop on Ctrl-C within 30 s (stopped by "
                                           f"{server.stopped_by}); its log ends:\n"
                                           f"{server.log_path.read_text(errors='replace')[-4000:]}")
    # Stopping ComfyUI (Ctrl-C) stops its workers and leaves no shared memory behind.
    from distri_core.runtime.shm import owned_segments

    assert not still_alive(pids, 15), "workers outlived the ComfyUI server"
    assert owned_segments(server.proc.pid) == []

