"""The errors the runtime raises to its callers (the pool, the cluster, the nodes)."""

from __future__ import annotations


class PoolError(RuntimeError):
    """The pool cannot do what was asked (bad request, not started, broken)."""


class WorkerError(PoolError):
    """A worker failed: carries rank, device, pid, the worker's message and traceback."""

    def __init__(self, rank: int, device: str, pid: int | None, message: str, remote_traceback: str = "",
                 kind: str = ""):
        super().__init__(f"worker rank {rank} on {device} (pid {pid}): {message}")
        self.rank, self.device, self.pid, self.kind = rank, device, pid, kind
        self.message = message
        self.remote_traceback = remote_traceback


class Cancelled(PoolError):
    """The caller's interrupt check fired while the workers were busy. `kept` tells whether the
    workers finished their request within the grace period (the pool is intact) or were stopped
    (the next use starts them again)."""

    def __init__(self, message: str, kept: bool):
        super().__init__(message)
        self.kept = kept


class ResourceError(PoolError):
    """Not enough host memory, shared memory or GPU memory for what was asked; the message names
    the bytes needed, the bytes available and the fix."""
