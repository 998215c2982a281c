"""Run functions on N local ranks joined in a torch.distributed group over loopback.

`LocalCluster` starts the ranks once (spawned, so the host's `__main__` never runs again) and
runs many tasks on them; every wait has a timeout, a failed rank's traceback comes back to the
caller, and the ranks exit when the caller closes the cluster or dies. Used by the benchmark and
the tests; the persistent worker pool builds on the same pieces.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any

from .groups import ParallelGroups, build_groups

log = logging.getLogger("distri_core")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A task raised on a rank; carries the rank and the rank's traceback."""

    def __init__(self, rank: int, message: str, remote_traceback: str, kind: str = ""):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        self.kind = kind
        self.remote_traceback = remote_traceback


@dataclass(frozen=True)
class RankInfo:
    """What a task function receives first: its rank and size, its groups and device."""

    rank: int
    world: int
    groups: ParallelGroups  # the task's ranks (0..world-1) and their CFG-split halves
    device: str


def watch_parent(parent: int, interval: float = 1.0) -> None:
    """Exit this process as soon as `parent` is no longer its parent (the parent died and the
    process was re-parented); run it in a daemon thread."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(3)


def _rank_main(rank: int, world: int, port: int, backend: str, threads: int, device: str,
               parent: int, tasks: mp.Queue, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    # Every sub-cluster 0..k-1 gets its groups now, created by all ranks in the same order.
    groups = {k: build_groups(range(k)) for k in range(1, world + 1)}
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs, size = task
        try:
            value = fn(RankInfo(rank, size, groups[size], device), *args, **kwargs)
            results.put((rank, "ok", value))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
            results.put((rank, "err", (f"{type(e).__name__}: {e}", traceback.format_exc(), type(e).__name__)))
    dist.destroy_process_group()


class LocalCluster:
    """`world` ranks on this machine. `run(fn, *args, size=k, **kwargs)` calls
    `fn(RankInfo, *args, **kwargs)` on ranks 0..k-1 (a sub-group) and returns their results in
    rank order."""

    def __init__(self, world: int, *, backend: str = "gloo", devices: list[str] | None = None,
                 threads: int = 1, start_timeout: float = 180.0):
        self.world = world
        self.closed = False
        self.devices = devices or ["cpu"] * world
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_rank_main, daemon=True, name=f"distri-rank{r}",
                        args=(r, world, port, backend, threads, self.devices[r], os.getpid(),
                              self._tasks[r], self._results))
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        try:
            self._collect(list(range(world)), start_timeout, expect="ready")
        except BaseException:
            self.close()
            raise

    def _collect(self, ranks: list[int], timeout: float, expect: str = "ok") -> list[Any]:
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        errors = []
        while len(out) + len(errors) < len(ranks):
            left = deadline - time.monotonic()
            dead = [p.name for p in self._procs if not p.is_alive()]
            if dead:
                self.close()
                raise RuntimeError(f"{', '.join(dead)} exited unexpectedly")
            if left <= 0:
                missing = sorted(set(ranks) - set(out) - {e.rank for e in errors})
                self.close()  # ranks still inside a collective cannot be reused
                if errors:
                    break
                raise TimeoutError(f"ranks {missing} did not answer within {timeout:.0f} s")
            try:
                rank, status, value = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if status == "err":
                errors.append(RankError(rank, value[0], value[1], value[2]))
                deadline = min(deadline, time.monotonic() + 10.0)  # peers may wait in a collective
            else:
                out[rank] = value
        if errors:
            errors.sort(key=lambda e: e.rank)
            raise errors[0]
        return [out[r] for r in ranks]

    @property
    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, *args, size: int | None = None, timeout: float = 600.0, **kwargs) -> list[Any]:
        if not self.alive:
            raise RuntimeError("the cluster is closed (a rank failed or timed out); start a new one")
        size = size or self.world
        if not 1 <= size <= self.world:
            raise ValueError(f"size={size} is not valid for a cluster of {self.world} ranks")
        task = (fn, args, kwargs, size)
        try:  # queues pickle in a background thread: fail here, not by a silent timeout
            ForkingPickler.dumps(task)
        except Exception as e:
            raise TypeError(f"cannot send this task to the ranks: {e}") from e
        for r in range(size):
            self._tasks[r].put(task)
        return self._collect(list(range(size)), timeout)

    def close(self) -> None:
        self.closed = True
        for q, p in zip(self._tasks, self._procs, strict=True):
            if p.is_alive():
                try:
                    q.put(None)
                except (ValueError, OSError):
                    pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
