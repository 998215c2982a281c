"""The worker processes themselves: start one per device (the GPU the host means), join them
over a rendezvous store that lives as long as they do, exchange messages over private pipes,
notice a dead worker or the caller's cancel, and stop them leaving nothing behind.

`WorkerPool` (the UNet service) and `LocalCluster` (tasks for the tests and the benchmark) both
start and join their workers here: there is one way to do it.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import wire
from .devices import worker_device
from .errors import Cancelled, PoolError, WorkerError
from .shm import remove_orphans, store_dir

log = logging.getLogger("distri_core.pool")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLL_S = 0.1  # how often a wait looks at dead workers and at the cancel check

Interrupted = Callable[[], bool]


@dataclass
class Proc:
    rank: int
    device: str
    popen: subprocess.Popen
    fd_to: int
    fd_from: int
    pid: int
    memory: dict = field(default_factory=dict)
    calls: int = 0
    last_error: str = ""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Workers:
    """One worker process per entry of `devices`, all in one torch.distributed world.

    A failure that leaves a worker in an unknown state (death, no answer, a cancel it did not
    finish within `cancel_grace`) stops them all: `dead_reason` says why, and the owner starts a
    new set. A worker's own error (an exception it caught) leaves them usable."""

    def __init__(self, devices: list[str], *, backend: str, threads: int, sys_path: tuple[str, ...] = (),
                 comm_timeout: float = 600.0, error_grace: float = 10.0, cancel_grace: float = 1.5,
                 env: dict[str, str] | None = None):
        self.devices = list(devices)
        self.backend = backend
        self.threads = threads
        self.sys_path = tuple(sys_path)
        self.comm_timeout, self.error_grace, self.cancel_grace = comm_timeout, error_grace, cancel_grace
        self.extra_env = dict(env or {})
        self.procs: list[Proc] = []
        self._store: str | None = None
        self.dead_reason = ""

    @property
    def world(self) -> int:
        return len(self.devices)

    # -- start and stop ---------------------------------------------------------------------------
    def start(self, timeout: float, interrupted: Interrupted | None = None) -> list[dict]:
        """Spawn every worker and wait until each has joined the process group, created its
        communicators and run a collective on each of its groups."""
        self.kill()
        remove_orphans()
        self.dead_reason = ""
        self._store = store_dir()
        env = self._env()
        try:
            for rank, device in enumerate(self.devices):
                self.procs.append(self._spawn(rank, device, os.path.join(self._store, "store"), env))
            return self.collect("ready", timeout, interrupted)
        except BaseException:
            self.kill()
            raise

    def _env(self) -> dict:
        env = dict(os.environ)
        paths = [PACKAGE_ROOT, *self.sys_path, *[p or os.getcwd() for p in sys.path]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        # Rendezvous and transport stay on this machine's loopback unless the user set otherwise.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", str(self.threads or 1))
        env.update(self.extra_env)
        return env

    def _spawn(self, rank: int, device: str, store: str, env: dict) -> Proc:
        dev, extra = worker_device(device, env)
        child_env = {**env, **extra}
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        cmd = [sys.executable, "-m", "distri_core.runtime.worker", "--rank", str(rank), "--world", str(self.world),
               "--device", dev, "--backend", self.backend, "--store", store, "--fd-in", str(to_r),
               "--fd-out", str(from_w), "--threads", str(self.threads), "--parent", str(os.getpid()),
               "--comm-timeout", str(self.comm_timeout)]
        try:
            popen = subprocess.Popen(cmd, pass_fds=(to_r, from_w), env=child_env, stdin=subprocess.DEVNULL,
                                     cwd=PACKAGE_ROOT, start_new_session=True)
        except BaseException:
            for fd in (to_w, from_r):
                os.close(fd)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        return Proc(rank, device, popen, to_w, from_r, popen.pid)

    def close(self, timeout: float = 5.0) -> None:
        """Ask every worker to exit, wait a little, then kill what is left."""
        for p in self.procs:
            try:
                wire.send(p.fd_to, {"op": "exit"})
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker (a stopped or stuck one too), reap it, close its pipes, and remove
        the rendezvous store."""
        for p in self.procs:
            if p.alive:
                p.popen.kill()
        for p in self.procs:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                log.error("worker rank %d (pid %d) did not exit after SIGKILL", p.rank, p.pid)
            for fd in (p.fd_to, p.fd_from):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.procs = []
        if self._store is not None:
            shutil.rmtree(self._store, ignore_errors=True)
            self._store = None

    # -- messages ---------------------------------------------------------------------------------
    def send(self, msg: dict, ranks: list[int] | None = None) -> None:
        for p in self.procs:
            if ranks is not None and p.rank not in ranks:
                continue
            try:
                wire.send(p.fd_to, msg)
            except OSError:
                self._dead(p)

    def request(self, msg: dict, timeout: float, interrupted: Interrupted | None = None) -> list[dict]:
        self.send(msg)
        return self.collect(msg["op"], timeout, interrupted)

    def collect(self, op: str, timeout: float, interrupted: Interrupted | None = None) -> list[dict]:
        """Every worker's reply to `op`, in rank order. Raises the lowest rank's WorkerError if
        any failed; stops the workers and raises when one dies, does not answer within `timeout`,
        or is still busy `cancel_grace` seconds after `interrupted()` turned true."""
        replies: dict[int, dict] = {}
        errors: list[WorkerError] = []
        pending = {p.fd_from: p for p in self.procs}
        deadline = time.monotonic() + timeout
        cancelled_at: float | None = None
        while pending:
            now = time.monotonic()
            if cancelled_at is None and interrupted is not None and interrupted():
                cancelled_at = now
                deadline = min(deadline, now + self.cancel_grace)
            left = deadline - now
            if left <= 0:
                break
            ready, _, _ = select.select(list(pending), [], [], min(left, POLL_S))
            for fd in ready:
                p = pending.pop(fd)
                try:
                    reply = wire.recv(fd)
                except (EOFError, OSError):
                    self._dead(p)
                p.memory = reply.get("memory", p.memory)
                if reply.get("ok"):
                    replies[p.rank] = reply
                else:
                    p.last_error = reply.get("error", "unknown error")
                    errors.append(WorkerError(p.rank, p.device, p.pid, p.last_error, reply.get("traceback", ""),
                                              reply.get("kind", "")))
                    # peers may be waiting for it inside a collective: give them a short grace
                    deadline = min(deadline, time.monotonic() + self.error_grace)
            for p in list(pending.values()):
                if not p.alive:
                    self._dead(p)
        first_error = min(errors, key=lambda e: e.rank) if errors else None
        if pending:  # ranks that never answered cannot be trusted: stop them all
            missing = sorted(p.rank for p in pending.values())
            if cancelled_at is not None:
                self._stop(f"cancelled while ranks {missing} were busy with {op!r}")
                raise Cancelled(f"cancelled: the workers were still busy with {op!r} {self.cancel_grace:.1f} s "
                                "after the cancel, so they were stopped; the next run starts them again", kept=False)
            reason = str(first_error) if first_error else f"ranks {missing} did not answer {op!r} within {timeout:.0f} s"
            self._stop(reason)
            if first_error is None:
                raise PoolError(f"worker ranks {missing} did not answer {op!r} within {timeout:.0f} s; the workers "
                                "were stopped and restart on next use (raise call_timeout for very large images on "
                                "slow devices)")
            raise first_error
        if first_error is not None:
            raise first_error
        if cancelled_at is not None:
            raise Cancelled(f"cancelled during {op!r}; the workers finished it and stay ready", kept=True)
        return [replies[r] for r in sorted(replies)]

    def _dead(self, p: Proc) -> None:
        code = p.popen.poll()
        if code is None:
            try:
                code = p.popen.wait(2)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
            if code == -signal.SIGKILL:
                how += " (often the system running out of memory)"
        else:
            how = f"exited with code {code}"
        self._stop(f"worker rank {p.rank} on {p.device} (pid {p.pid}) died: {how}")
        raise WorkerError(p.rank, p.device, p.pid, f"died: {how}", kind="WorkerDied")

    def _stop(self, reason: str) -> None:
        self.dead_reason = reason
        log.error("worker processes stopped: %s", reason)
        self.kill()
