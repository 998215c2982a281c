"""Run functions on N local ranks joined in a torch.distributed group: the same worker
processes the pool uses (`procs.Workers`, `python -m distri_core.runtime.worker`), asked to run
a task instead of a UNet call.

`LocalCluster(world).run(fn, *args, size=k)` calls `fn(RankInfo, *args)` on ranks 0..k-1 (a
sub-world whose groups every rank creates, after start-up, the first time size k is asked for)
and returns their results in rank order. Every wait has a timeout; a failed rank's traceback
comes back to the caller; the ranks exit when the caller closes the cluster or dies. Used by the
benchmark and the tests.
"""

from __future__ import annotations

import importlib
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Any

from .errors import PoolError, WorkerError
from .groups import RankInfo
from .procs import Workers

__all__ = ["LocalCluster", "RankError", "RankInfo", "free_port"]


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


def _importable(fn: Callable) -> Callable:
    """`fn` as the ranks can import it: a function of `python -m package.module`'s __main__ is
    the same function of package.module (the ranks never run the host's __main__)."""
    if getattr(fn, "__module__", None) != "__main__":
        return fn
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise TypeError(f"{fn.__name__} is defined in a script the ranks cannot import; define it in a module "
                        "(or run the script with python -m)")
    return getattr(importlib.import_module(spec.name), fn.__qualname__)


class LocalCluster:
    """`world` ranks on this machine (CPU ranks on gloo unless told otherwise)."""

    def __init__(self, world: int, *, backend: str = "gloo", devices: list[str] | None = None,
                 threads: int = 1, start_timeout: float = 180.0, sys_path: tuple[str, ...] = ()):
        self.world = world
        self.devices = devices or ["cpu"] * world
        self._workers = Workers(self.devices, backend=backend, threads=threads, sys_path=sys_path)
        self._workers.start(start_timeout)

    @property
    def alive(self) -> bool:
        return bool(self._workers.procs) and all(p.alive for p in self._workers.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._workers.procs]

    def run(self, fn: Callable, *args, size: int | None = None, timeout: float = 600.0, **kwargs) -> list[Any]:
        if not self.alive:
            raise RuntimeError("the cluster is closed (a rank failed or timed out); start a new one")
        size = size or self.world
        if not 1 <= size <= self.world:
            raise ValueError(f"size={size} is not valid for a cluster of {self.world} ranks")
        fn = _importable(fn)
        try:
            task = pickle.dumps((fn, args, kwargs))
        except Exception as e:
            raise TypeError(f"cannot send this task to the ranks: {e}") from e
        try:
            replies = self._workers.request({"op": "task", "task": task, "size": size}, timeout)
        except WorkerError as e:
            if e.kind == "WorkerDied":
                raise RuntimeError(str(e)) from e
            raise RankError(e.rank, e.message, e.remote_traceback, e.kind) from e
        except PoolError as e:
            if not self.alive:
                raise TimeoutError(str(e)) from e
            raise
        return [r["value"] for r in replies[:size]]

    def close(self) -> None:
        self._workers.close()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
