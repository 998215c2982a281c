"""A persistent pool of worker processes, one per device, that runs the patch-parallel UNet.

The host (ComfyUI) keeps the sampler; each UNet evaluation goes to the pool: inputs through
shared memory, every rank computes its band and writes it straight into the shared output.

    pool = WorkerPool(["cuda:0", "cuda:1"])            # or ["cpu", "cpu"] (gloo)
    pool.configure(PatchParallelConfig(world_size=2))
    pool.load_model(key, spec, state_dict)            # ships nothing if key is already loaded
    eps = pool(x, timesteps, context, key=("cond",))  # as DistriUNet.__call__
    pool.end_run()                                    # between sampling runs (or after a cancel)

Workers are started with `python -m distri_core.runtime.worker` (the host's `__main__` never
runs again), join over a FileStore (no listening socket) and gloo/NCCL bound to loopback, and
exit with the host. Every wait has a timeout; a worker error reaches the caller as
`WorkerError` naming rank, device and message; a dead worker is noticed within a second and
the next use starts a fresh pool.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PatchParallelConfig
from . import wire
from .shm import SharedArena, remove_orphans

log = logging.getLogger("distri_core.pool")

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the model the weights are loaded into.

    factory:  'package.module:callable' (or '/path/file.py:callable') returning the UNet module;
              called under torch.device('meta') with `kwargs`, then given the shipped weights.
    kwargs:   plain data for the factory (classes and dtypes pickle by reference).
    dtype:    the dtype the workers compute in.
    setup:    optional 'module:callable' run (with `setup_kwargs`) in the worker before the
              factory is resolved, e.g. to make the host application importable there.
    sys_path: import paths the worker needs (e.g. the ComfyUI checkout).
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    setup: str | None = None
    setup_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sys_path: tuple[str, ...] = ()


@dataclass
class LazyWeights:
    """Weights announced by (name, shape, dtype) and produced one at a time by `get(name)`."""

    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    get: Callable[[str], torch.Tensor]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> LazyWeights:
        return cls([(k, tuple(v.shape), v.dtype) for k, v in state.items()], state.__getitem__)


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


@dataclass
class _Proc:
    rank: int
    device: str
    popen: subprocess.Popen
    fd_to: int
    fd_from: int
    pid: int
    memory: dict = field(default_factory=dict)
    calls: int = 0
    last_error: str = ""


_LIVE: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _close_all() -> None:
    for pool in list(_LIVE):
        pool.close()


atexit.register(_close_all)


def available_devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


class WorkerPool:
    """Worker processes on `devices` (one rank each). Thread-safe; one request at a time."""

    def __init__(self, devices: list[str], *, backend: str | None = None, threads: int | None = None,
                 sys_path: tuple[str, ...] = (), start_timeout: float = 180.0, call_timeout: float = 1800.0,
                 error_grace: float = 10.0):
        if not devices:
            raise PoolError("a pool needs at least one device; pass e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu']")
        self.devices = [str(torch.device(d)) for d in devices]
        kinds = {torch.device(d).type for d in self.devices}
        if len(kinds) > 1:
            raise PoolError(f"devices {self.devices} mix device types; use all GPUs or all CPU ranks")
        self.device_type = kinds.pop()
        if self.device_type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            bad = [d for d in self.devices if (torch.device(d).index or 0) >= count]
            if bad:
                raise PoolError(f"devices {bad} do not exist: this machine has {count} CUDA device(s); "
                                f"use {', '.join(f'cuda:{i}' for i in range(count)) or 'cpu ranks'}")
        elif self.device_type != "cpu":
            raise PoolError(f"device type {self.device_type!r} is not supported; use cuda or cpu")
        self.backend = backend or ("nccl" if self.device_type == "cuda" else "gloo")
        self.threads = threads if threads is not None else (max(1, (os.cpu_count() or 1) // len(self.devices))
                                                            if self.device_type == "cpu" else 0)
        self.sys_path = tuple(sys_path)
        self.start_timeout, self.call_timeout, self.error_grace = start_timeout, call_timeout, error_grace
        self._procs: list[_Proc] = []
        self._lock = threading.RLock()
        self.state = "stopped"
        self.model_key: Hashable | None = None
        self.model_info: dict = {}
        self.config: PatchParallelConfig | None = None
        self._arena: SharedArena | None = None
        self.runs = 0
        self.calls = 0
        self.last_error = ""
        self.last_call: dict = {}
        _LIVE.add(self)

    @property
    def world(self) -> int:
        return len(self.devices)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self.state == "ready":
                return
            self._kill()
            remove_orphans()
            store_dir = tempfile.mkdtemp(prefix="distri-store-")
            store = os.path.join(store_dir, "store")
            env = self._child_env()
            try:
                for rank, device in enumerate(self.devices):
                    self._procs.append(self._spawn(rank, device, store, env))
                self._collect("ready", self.start_timeout)
            except BaseException:
                self._kill()
                raise
            finally:
                for name in os.listdir(store_dir):
                    os.unlink(os.path.join(store_dir, name))
                os.rmdir(store_dir)
            self.state = "ready"
            self.model_key, self.model_info = None, {}
            if self.config is not None:
                self._request({"op": "configure", "config": self.config}, self.start_timeout)
            log.info("pool ready: %s", ", ".join(f"rank {p.rank} {p.device} pid {p.pid}" for p in self._procs))

    def _child_env(self) -> dict:
        env = dict(os.environ)
        paths = [_PACKAGE_ROOT, *self.sys_path, *[p for p in sys.path if p]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        # Rendezvous and transport stay on this machine's loopback unless the user set otherwise.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", str(self.threads or 1))
        return env

    def _spawn(self, rank: int, device: str, store: str, env: dict) -> _Proc:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        child_env = dict(env)
        dev = device
        if device.startswith("cuda"):
            child_env["CUDA_VISIBLE_DEVICES"] = str(torch.device(device).index or 0)
            dev = "cuda:0"
        cmd = [sys.executable, "-m", "distri_core.runtime.worker", "--rank", str(rank), "--world", str(self.world),
               "--device", dev, "--backend", self.backend, "--store", store, "--fd-in", str(to_r),
               "--fd-out", str(from_w), "--threads", str(self.threads), "--parent", str(os.getpid())]
        popen = subprocess.Popen(cmd, pass_fds=(to_r, from_w), env=child_env, stdin=subprocess.DEVNULL,
                                 cwd=_PACKAGE_ROOT, start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        return _Proc(rank, device, popen, to_w, from_r, popen.pid)

    def close(self) -> None:
        """Stop the workers (politely, then by force) and free shared memory."""
        with self._lock:
            for p in self._procs:
                try:
                    wire.send(p.fd_to, {"op": "exit"})
                except OSError:
                    pass
            deadline = time.monotonic() + 5.0
            for p in self._procs:
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
            self.state = "stopped"

    def _kill(self) -> None:
        for p in self._procs:
            if p.popen.poll() is None:
                p.popen.kill()
        for p in self._procs:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                log.error("worker rank %d (pid %d) did not exit after SIGKILL", p.rank, p.pid)
            for fd in (p.fd_to, p.fd_from):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._procs = []
        if self._arena is not None:
            self._arena.unlink()
            self._arena = None
        self.model_key, self.model_info = None, {}

    def _ensure(self) -> None:
        if self.state != "ready":
            if self.state == "broken":
                log.warning("restarting the worker pool after: %s", self.last_error)
            self.start()

    # -- messaging --------------------------------------------------------------------------------
    def _request(self, msg: dict, timeout: float) -> list[dict]:
        for p in self._procs:
            try:
                wire.send(p.fd_to, msg)
            except OSError:
                self._fail_dead(p)
        return self._collect(msg["op"], timeout)

    def _collect(self, op: str, timeout: float) -> list[dict]:
        replies: dict[int, dict] = {}
        errors: list[WorkerError] = []
        pending = {p.fd_from: p for p in self._procs}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(pending), [], [], min(left, 0.25))
            for fd in ready:
                p = pending.pop(fd)
                try:
                    reply = wire.recv(fd)
                except (EOFError, OSError):
                    self._fail_dead(p)
                p.memory = reply.get("memory", p.memory)
                if reply.get("ok"):
                    replies[p.rank] = reply
                else:
                    p.last_error = reply.get("error", "unknown error")
                    errors.append(WorkerError(p.rank, p.device, p.pid, p.last_error, reply.get("traceback", ""),
                                              reply.get("kind", "")))
                    # peers may be waiting for it inside a collective: give them a short grace
                    deadline = min(deadline, time.monotonic() + self.error_grace)
            for p in pending.values():
                if p.popen.poll() is not None:
                    self._fail_dead(p)
        if pending or errors:
            err = sorted(errors, key=lambda e: e.rank)[0] if errors else None
            if pending:  # ranks that never answered cannot be trusted: the pool is rebuilt
                missing = sorted(p.rank for p in pending.values())
                self._break(str(err) if err else f"ranks {missing} did not answer {op!r} within {timeout:.0f} s")
                if err is None:
                    raise PoolError(f"worker ranks {missing} did not answer {op!r} within {timeout:.0f} s; "
                                    "the pool was stopped and restarts on next use (raise call_timeout for very "
                                    "large images on slow devices)")
            self.last_error = str(err)
            raise err
        return [replies[r] for r in sorted(replies)]

    def _fail_dead(self, p: _Proc) -> None:
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
        message = f"worker rank {p.rank} on {p.device} (pid {p.pid}) died: {how}"
        self._break(message)
        raise WorkerError(p.rank, p.device, p.pid, f"died: {how}", kind="WorkerDied")

    def _break(self, reason: str) -> None:
        self.last_error = reason
        log.error("worker pool stopped: %s", reason)
        self._kill()
        self.state = "broken"

    # -- requests -------------------------------------------------------------------------------
    def configure(self, config: PatchParallelConfig) -> None:
        """Set mode, warm-up, CFG split, comm dtype; no restart unless the rank count changes."""
        if config.world_size != self.world:
            raise PoolError(f"config.world_size={config.world_size} but the pool has {self.world} worker(s) on "
                            f"{self.devices}; start a pool with {config.world_size} device(s)")
        with self._lock:
            if config == self.config and self.state == "ready":
                return
            self.config = config
            if self.state == "ready":
                self._request({"op": "configure", "config": config}, self.start_timeout)

    def load_model(self, key: Hashable, spec: ModelSpec, weights, label: str | None = None) -> dict:
        """Make `key` the loaded model. Ships `weights` through shared memory unless `key` is
        already loaded. `weights` is a mapping name -> tensor, a function returning one (called
        only when needed), or a `LazyWeights` (tensors produced one at a time, so the host never
        holds a second full copy). `label` names the model in status reports."""
        with self._lock:
            self._ensure()
            if key == self.model_key:
                return self.model_info
            if callable(weights) and not isinstance(weights, LazyWeights):
                weights = weights()
            if not isinstance(weights, LazyWeights):
                weights = LazyWeights.of(weights)
            self.model_key, self.model_info = None, {}  # workers drop the old model first
            names = [name for name, _, _ in weights.entries]
            refs, size = wire.plan_shapes([(shape, dtype) for _, shape, dtype in weights.entries])
            arena = SharedArena.create(size)
            try:
                for name, ref in zip(names, refs, strict=True):
                    tensor = weights.get(name)
                    if tuple(tensor.shape) != ref.shape or tensor.dtype != ref.dtype:
                        raise PoolError(f"weight {name}: got {tuple(tensor.shape)} {tensor.dtype}, announced "
                                        f"{ref.shape} {ref.dtype}")
                    arena.view(ref.offset, ref.shape, ref.dtype).copy_(tensor.detach())
                    del tensor
                # The spec's kwargs may name classes of the host application: the worker unpickles
                # them only after `setup` has made that application importable.
                msg = {"op": "load", "key": key, "setup": (spec.setup, dict(spec.setup_kwargs), spec.sys_path),
                       "spec": pickle.dumps(spec), "arena": arena.path, "size": size, "names": names, "refs": refs}
                replies = self._request(msg, self.start_timeout + size / 2 ** 28)
            finally:
                arena.unlink()
            self.model_key = key
            self.model_info = {k: replies[0].get(k) for k in ("out_channels", "param_mb")}
            self.model_info["label"] = label or str(key)
            return self.model_info

    def __call__(self, x: torch.Tensor, timesteps, context=None, *, key: Hashable = None, sync: bool | None = None,
                 **kwargs) -> torch.Tensor:
        """The UNet output for the full input, computed by all ranks (see DistriUNet)."""
        with self._lock:
            if self.state != "ready":
                why = f": {self.last_error}" if self.state == "broken" and self.last_error else ""
                raise PoolError(f"the worker pool is {self.state}{why}; the next run (load_model) starts it again")
            if self.model_key is None:
                raise PoolError("no model loaded: call load_model() first")
            if self.config is None:
                raise PoolError("no configuration: call configure() first")
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise PoolError(f"x must be a latent tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
            if not x.is_floating_point():
                raise PoolError(f"x must be floating point, got {x.dtype}")
            t0 = time.perf_counter()
            tensors: list[torch.Tensor] = []
            tree = wire.flatten((x, timesteps, context, kwargs), tensors)
            refs, end = wire.plan(tensors)
            out_c = self.model_info.get("out_channels") or x.shape[1]
            out_ref = wire.TensorRef(end, (x.shape[0], out_c, x.shape[2], x.shape[3]), x.dtype)
            size = wire.aligned(end + out_ref.nbytes)
            fresh_arena = self._arena is None or self._arena.size < size
            if fresh_arena:
                if self._arena is not None:
                    self._arena.unlink()
                self._arena = SharedArena.create(max(size, int(size * 1.25)))
            wire.write(self._arena, refs, tensors)
            msg = {"op": "call", "arena": self._arena.path, "size": self._arena.size, "refs": refs, "tree": tree,
                   "out": out_ref, "key": key, "sync": sync}
            t1 = time.perf_counter()
            replies = self._request(msg, self.call_timeout)
            if fresh_arena:
                self._arena.unlink()  # every worker has it mapped now
            out = self._arena.view(out_ref.offset, out_ref.shape, out_ref.dtype).clone()
            t2 = time.perf_counter()
            compute = max(r["seconds"] for r in replies)
            self.calls += 1
            for p in self._procs:
                p.calls += 1
            self.last_call = {"seconds": t2 - t0, "worker_seconds": compute, "overhead_s": (t2 - t0) - compute,
                              "send_s": t1 - t0, "bytes_sent": max(r["bytes_sent"] for r in replies),
                              "collectives": max(r["collectives"] for r in replies),
                              "busy_s": sum(r["seconds"] - r["wait_s"] for r in replies),
                              "wait_s": max(r["wait_s"] for r in replies)}
            return out.to(x.device) if x.device.type != "cpu" else out

    def end_run(self) -> None:
        """Forget stale state on every rank (between runs, or after a cancelled run)."""
        with self._lock:
            if self.state == "ready":
                self._request({"op": "reset"}, self.start_timeout)
                self.runs += 1

    def status(self) -> dict:
        """A snapshot for the GUI and diagnostics; never blocks on the workers."""
        workers = []
        for p in list(self._procs):
            alive = p.popen.poll() is None
            workers.append({"rank": p.rank, "device": p.device, "pid": p.pid, "alive": alive,
                            "memory": dict(p.memory), "calls": p.calls, "last_error": p.last_error})
        return {"state": self.state, "devices": list(self.devices), "backend": self.backend,
                "model_key": None if self.model_key is None else str(self.model_key),
                "model": self.model_info.get("label"), "model_mb": self.model_info.get("param_mb"), "runs": self.runs,
                "calls": self.calls, "last_error": self.last_error, "last_call": dict(self.last_call),
                "config": None if self.config is None else {
                    "world_size": self.config.world_size, "mode": self.config.mode.value,
                    "warmup_steps": self.config.warmup_steps, "cfg_split": self.config.cfg_split,
                    "comm_dtype": self.config.comm_dtype.value},
                "workers": workers}

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool(devices: list[str], **options) -> WorkerPool:
    """The process-wide pool on `devices`: reused while the devices and options stay the same,
    replaced (the old one stopped cleanly) when they change."""
    global _SHARED
    with _SHARED_LOCK:
        wanted = [str(torch.device(d)) for d in devices]
        pool = _SHARED
        if pool is not None and (pool.devices != wanted or any(getattr(pool, k, v) != v for k, v in options.items())):
            pool.close()
            pool = None
        if pool is None:
            pool = _SHARED = WorkerPool(wanted, **options)
        return pool


def current_pool() -> WorkerPool | None:
    return _SHARED
