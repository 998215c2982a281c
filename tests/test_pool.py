"""The persistent worker pool on CPU ranks (gloo): results, faults, cancellation, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pool_models
import pytest
import tasks
import torch
from comfy_server import pid_alive, still_alive

from distri_core import PatchParallelConfig
from distri_core.runtime.pool import PoolError, WorkerError, WorkerPool, shared_pool
from distri_core.runtime.shm import owned_segments, shm_dir
from distri_core.sampling import ddim_sample

EXACT = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def _inputs(batch=2, height=48, width=40):
    x, t, ctx, _ = tasks.inputs("diffusers", "micro", batch, height, width)
    return x, t, ctx


_reference = pool_models.micro_reference


@pytest.fixture(scope="module")
def pool2():
    with pool_models.micro_pool() as pool:
        yield pool


def test_pool_equals_single_device(pool2):
    x, t, ctx = _inputs()
    out = pool2(x, t, ctx)
    assert (out - _reference(x, t, ctx)).abs().max() < EXACT
    assert pool2.last_call["bytes_sent"] > 0
    status = pool2.status()
    assert status["state"] == "ready" and status["model_key"] == "micro-0"
    assert [w["rank"] for w in status["workers"]] == [0, 1] and all(w["alive"] for w in status["workers"])
    assert all(w["memory"]["rss_mb"] > 0 for w in status["workers"])
    # CFG split: each rank takes one half of the batch
    pool2.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=True))
    assert (pool2(x, t, ctx) - _reference(x, t, ctx)).abs().max() < EXACT
    pool2.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=False))


def test_second_key_replaces_the_model_and_same_key_ships_nothing(pool2):
    x, t, ctx = _inputs()
    pool2.load_model("micro-1", pool_models.micro_spec(), lambda: pool_models.micro_weights(seed=1))
    out1 = pool2(x, t, ctx)
    assert (out1 - _reference(x, t, ctx, seed=1)).abs().max() < EXACT
    shipped = []
    pool2.load_model("micro-1", pool_models.micro_spec(), lambda: shipped.append(1) or {})
    assert shipped == []  # same key: the weights function is not even called
    pool2.load_model("micro-0", pool_models.micro_spec(), pool_models.micro_weights)
    assert (pool2(x, t, ctx) - _reference(x, t, ctx)).abs().max() < EXACT


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_calls_do_not_grow_memory_or_files(pool2):
    x, t, ctx = _inputs(batch=1, height=16, width=16)
    for _ in range(20):
        pool2(x, t, ctx)
    fds, rss = _fds(), [w["memory"]["rss_mb"] for w in pool2.status()["workers"]]
    segments = len(os.listdir(shm_dir()))
    for i in range(200):
        pool2(x * (1 + i * 1e-3), t, ctx, key=("k", i % 2))
    pool2.end_run()
    assert _fds() <= fds + 2
    assert len(os.listdir(shm_dir())) <= segments
    for before, w in zip(rss, pool2.status()["workers"], strict=True):
        assert w["memory"]["rss_mb"] < before + 40, (before, w["memory"])


@pytest.mark.parametrize("request_kind, fragment", [
    ("3d", "x must be a latent tensor [B, C, H, W]"),
    ("int", "x must be floating point"),
    ("height", "latent height 49 is not a multiple of 2"),
    ("context", "mat1 and mat2 shapes cannot be multiplied"),
    ("world", "config.world_size=3 but the pool has 2 worker(s)"),
    ("factory", "No module named 'no_such_module'"),
])
def test_bad_requests_fail_clearly_and_leave_the_pool_usable(pool2, request_kind, fragment):
    x, t, ctx = _inputs()
    with pytest.raises((PoolError, ValueError)) as e:
        if request_kind == "3d":
            pool2(x[0], t, ctx)
        elif request_kind == "int":
            pool2(x.long(), t, ctx)
        elif request_kind == "height":
            pool2(torch.randn(2, 4, 49, 40), t, ctx)
        elif request_kind == "context":
            pool2(x, t, torch.randn(2, 7, 33))
        elif request_kind == "world":
            pool2.configure(PatchParallelConfig(world_size=3))
        elif request_kind == "factory":
            from distri_core.runtime.pool import ModelSpec
            pool2.load_model("broken", ModelSpec("no_such_module:Model"), pool_models.micro_weights)
    assert fragment in str(e.value)
    if isinstance(e.value, WorkerError):
        assert e.value.rank == 0 and e.value.device == "cpu" and e.value.pid > 0
    assert pool2.state == "ready"
    if request_kind == "factory":  # a failed load leaves no model: load again
        pool2.load_model("micro-0", pool_models.micro_spec(), pool_models.micro_weights)
    assert (pool2(x, t, ctx) - _reference(x, t, ctx)).abs().max() < EXACT


def test_rank_count_beyond_the_devices_is_refused():
    with pytest.raises(PoolError, match=r"devices \['cuda:3'\] do not exist: this machine has \d+ CUDA device"):
        WorkerPool(["cuda:3"])
    with pytest.raises(PoolError, match="mix device types"):
        WorkerPool(["cpu", "cuda:0"])


def test_worker_exception_names_its_rank(pool2):
    from distri_core.runtime.pool import ModelSpec

    spec = ModelSpec("pool_models:failing_factory", pool_models.micro_spec().kwargs,
                     sys_path=(str(Path(__file__).parent),))
    with pytest.raises(WorkerError) as e:
        pool2.load_model("flaky", spec, pool_models.micro_weights)
    assert e.value.rank == 1 and "deliberate failure on rank 1" in str(e.value)
    assert "worker rank 1 on cpu (pid" in str(e.value) and "failing_factory" in e.value.remote_traceback
    assert pool2.state == "ready" and pool2.status()["workers"][1]["last_error"]
    pool2.load_model("micro-0", pool_models.micro_spec(), pool_models.micro_weights)
    x, t, ctx = _inputs()
    assert (pool2(x, t, ctx) - _reference(x, t, ctx)).abs().max() < EXACT


def test_killed_worker_fails_the_call_fast_and_the_next_run_works(pool2):
    pool2.configure(PatchParallelConfig(world_size=2, mode="corrected_async_gn", warmup_steps=1, cfg_split=False))
    x, t, ctx = _inputs(batch=2, height=96, width=96)  # a call long enough to kill it midway
    pool2(x, t, ctx)
    victim = pool2.status()["workers"][1]["pid"]
    threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as e:
        for _ in range(20):
            pool2(x, t, ctx)
    assert time.monotonic() - t0 < 10.0
    assert "died: killed by SIGKILL" in str(e.value) and e.value.rank == 1
    assert pool2.state == "broken"
    old = [w["pid"] for w in pool2.status()["workers"]]
    assert not old or not any(pid_alive(p) for p in old)
    with pytest.raises(PoolError, match="the worker pool is broken: worker rank 1 on cpu"):
        pool2(x, t, ctx)  # mid-run: no silent restart without the model
    # the next run (load_model) starts a fresh pool; the model is shipped again
    pool2.load_model("micro-0", pool_models.micro_spec(), pool_models.micro_weights)
    pool2.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=False))
    xs, ts, cs = _inputs()
    assert (pool2(xs, ts, cs) - _reference(xs, ts, cs)).abs().max() < EXACT
    assert pool2.state == "ready" and victim not in [w["pid"] for w in pool2.status()["workers"]]


def _run(pool, x, ctx, steps, cancel=lambda i: False):
    """A sampling run through the pool that checks for cancellation between calls."""
    done = []

    def eps(xt, t, i):
        if cancel(i):
            raise KeyboardInterrupt("cancelled")
        done.append(i)
        return pool(xt, torch.full((xt.shape[0],), float(t)), ctx)

    try:
        return ddim_sample(eps, x, steps), done
    except KeyboardInterrupt:
        return None, done
    finally:
        pool.end_run()


def test_cancel_between_calls_then_a_correct_run(pool2):
    pool2.configure(PatchParallelConfig(world_size=2, mode="corrected_async_gn", warmup_steps=1))
    x, _, ctx = _inputs(batch=1)
    expected, _ = _run(pool2, x, ctx, 8)
    flag = threading.Event()
    out, done = _run(pool2, x, ctx, 8, cancel=lambda i: (i == 3 and flag.set()) or flag.is_set())
    assert out is None and done == [0, 1, 2]  # stopped at the next call after the cancel
    again, _ = _run(pool2, x, ctx, 8)
    assert torch.equal(again, expected)  # no stale state leaked from the cancelled run
    pool2.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=False))


def test_reconfigure_from_two_to_three_ranks_and_shutdown_leaves_nothing():
    before = owned_segments()  # the module's pool keeps its rendezvous store while it runs
    pool = shared_pool(["cpu", "cpu"])
    pool.configure(PatchParallelConfig(world_size=2, mode="full_sync"))
    pool.load_model("m", pool_models.micro_spec(), pool_models.micro_weights)
    x, t, ctx = _inputs()
    assert (pool(x, t, ctx) - _reference(x, t, ctx)).abs().max() < EXACT
    old = [w["pid"] for w in pool.status()["workers"]]
    pool3 = shared_pool(["cpu", "cpu", "cpu"])
    assert pool3 is not pool and pool.state == "stopped" and not any(pid_alive(p) for p in old)
    pool3.configure(PatchParallelConfig(world_size=3, mode="full_sync"))
    pool3.load_model("m", pool_models.micro_spec(), pool_models.micro_weights)
    assert (pool3(x, t, ctx) - _reference(x, t, ctx)).abs().max() < EXACT
    pids = [w["pid"] for w in pool3.status()["workers"]]
    pool3.close()
    time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids)
    assert owned_segments() == before


HOST = textwrap.dedent("""
    import sys, time, torch
    sys.path[:0] = [{root!r}, {tests!r}]
    import pool_models
    from distri_core import PatchParallelConfig
    from distri_core.runtime.pool import WorkerPool
    pool = WorkerPool(["cpu", "cpu"])
    pool.configure(PatchParallelConfig(world_size=2))
    pool.load_model("m", pool_models.micro_spec(), pool_models.micro_weights)
    pool(torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 7, 32))
    print(" ".join(str(w["pid"]) for w in pool.status()["workers"]), flush=True)
    time.sleep(600)
""")


def test_killed_host_leaves_no_workers_or_segments(tmp_path):
    script = tmp_path / "host.py"
    script.write_text(HOST.format(root=str(ROOT), tests=str(Path(__file__).parent)))
    host = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in host.stdout.readline().split()]
    assert len(pids) == 2
    host.kill()
    host.wait(60)
    assert not still_alive(pids, 10)
    assert owned_segments(host.pid) == []
