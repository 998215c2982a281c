"""A persistent pool of worker processes, one per device, that runs the patch-parallel UNet.

The host (ComfyUI) keeps the sampler; each UNet evaluation goes to the pool: inputs through
shared memory, every rank computes its band and writes it straight into the shared output.

    pool = WorkerPool(["cuda:0", "cuda:1"])            # or ["cpu", "cpu"] (gloo)
    pool.configure(PatchParallelConfig(world_size=2))
    pool.load_model(key, spec, state_dict)            # ships nothing if key is already loaded
    eps = pool(x, timesteps, context, key=("cond",))  # as DistriUNet.__call__
    pool.end_run()                                    # between sampling runs (or after a cancel)

Starting, messaging and stopping the processes is `procs.Workers`' job, moving the weights
`shipping`'s. Every wait has a timeout and looks at `interrupt_check` (ComfyUI's cancel) ten
times a second; a worker error reaches the caller as `WorkerError` naming rank, device and
message; a dead worker is noticed within a second and the next run starts a fresh pool.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import threading
import time
import weakref
from collections.abc import Hashable

import torch

from ..config import PatchParallelConfig
from . import wire
from .devices import available_devices
from .errors import Cancelled, PoolError, ResourceError, WorkerError
from .procs import Interrupted, Workers
from .shipping import CHUNK_BYTES, LazyWeights, ModelSpec, ship_chunked, ship_shared
from .shm import SharedArena

__all__ = ["WorkerPool", "ModelSpec", "LazyWeights", "PoolError", "WorkerError", "Cancelled", "ResourceError",
           "available_devices", "shared_pool", "current_pool"]

log = logging.getLogger("distri_core.pool")

_LIVE: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _close_all() -> None:
    for pool in list(_LIVE):
        pool.close()


atexit.register(_close_all)


NCCL_HINT = ("NCCL could not set up its communicators between the GPUs. In a container, give it shared memory "
             "(docker run --shm-size=16g); on consumer GPUs without working peer-to-peer (many RTX cards), start "
             "ComfyUI with NCCL_P2P_DISABLE=1; NCCL_DEBUG=INFO in the environment shows the transport it tried")


def with_nccl_hint(error: WorkerError, backend: str) -> WorkerError:
    """A start-up error with what to try, when NCCL is what failed."""
    text = f"{error.message} {error.remote_traceback}".lower()
    if backend != "nccl" or "nccl" not in text:
        return error
    return WorkerError(error.rank, error.device, error.pid, f"{error.message}. {NCCL_HINT}", error.remote_traceback,
                       error.kind)


class WorkerPool:
    """Worker processes on `devices` (one rank each). Thread-safe; one request at a time.

    weights:  'auto' (CPU ranks share one copy, GPU ranks stream in chunks), 'shared' or 'chunked'.
    share_devices: allow several ranks on one GPU. Only for tests on a one-GPU machine with the
              gloo backend (NCCL refuses it, and real runs gain nothing from it).
    """

    def __init__(self, devices: list[str], *, backend: str | None = None, threads: int | None = None,
                 sys_path: tuple[str, ...] = (), start_timeout: float = 180.0, call_timeout: float = 1800.0,
                 error_grace: float = 10.0, cancel_grace: float = 1.5, weights: str = "auto",
                 chunk_bytes: int = CHUNK_BYTES, share_devices: bool = False,
                 interrupt_check: Interrupted | None = None):
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
        dup = sorted({d for d in self.devices if self.devices.count(d) > 1}) if self.device_type == "cuda" else []
        if dup and not (share_devices and self.backend == "gloo"):
            raise PoolError(f"device {dup[0]} is listed more than once; each rank needs a GPU of its own (NCCL "
                            "cannot run two ranks on one GPU); list distinct devices")
        if weights not in ("auto", "shared", "chunked"):
            raise PoolError(f"weights={weights!r} is not valid; use 'auto', 'shared' or 'chunked'")
        if weights == "shared" and self.device_type != "cpu":
            raise PoolError("weights='shared' works only for CPU ranks (GPU ranks copy their weights); use 'auto'")
        self.weights = ("shared" if self.device_type == "cpu" else "chunked") if weights == "auto" else weights
        self.chunk_bytes = chunk_bytes
        self.threads = threads if threads is not None else (max(1, (os.cpu_count() or 1) // len(self.devices))
                                                            if self.device_type == "cpu" else 0)
        self.sys_path = tuple(sys_path)
        self.start_timeout, self.call_timeout = start_timeout, call_timeout
        self.interrupt_check = interrupt_check
        self._workers = Workers(self.devices, backend=self.backend, threads=self.threads, sys_path=self.sys_path,
                                error_grace=error_grace, cancel_grace=cancel_grace)
        self._lock = threading.RLock()
        self.state = "stopped"
        self.model_key: Hashable | None = None
        self.model_info: dict = {}
        self.config: PatchParallelConfig | None = None
        self._arena: SharedArena | None = None
        self.runs = 0
        self.calls = 0
        self.releases = 0
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
            self._drop_arena()
            self.model_key, self.model_info = None, {}
            try:
                self._workers.start(self.start_timeout, self.interrupt_check)
            except WorkerError as e:
                self.state = "broken" if self._workers.dead_reason else "stopped"
                raise with_nccl_hint(e, self.backend) from e
            except BaseException:
                self.state = "broken" if self._workers.dead_reason else "stopped"
                raise
            self.state = "ready"
            if self.config is not None:
                self._request({"op": "configure", "config": self.config}, self.start_timeout)
            log.info("pool ready: %s", ", ".join(f"rank {p.rank} {p.device} pid {p.pid}" for p in self._workers.procs))

    def close(self) -> None:
        """Stop the workers (politely, then by force) and free shared memory."""
        with self._lock:
            self._workers.close()
            self._drop_arena()
            self.model_key, self.model_info = None, {}
            self.state = "stopped"

    def _drop_arena(self) -> None:
        if self._arena is not None:
            self._arena.unlink()
            self._arena = None

    def _ensure(self) -> None:
        if self.state != "ready":
            if self.state == "broken":
                log.warning("restarting the worker pool after: %s", self.last_error)
            self.start()

    def _guard(self, fn):
        """Run one exchange with the workers; a failure that stopped them marks the pool broken."""
        try:
            return fn()
        except BaseException as e:
            if not self._workers.procs:  # the workers were stopped (death, timeout, cancel)
                self.state = "broken"
                self.model_key, self.model_info = None, {}
                self._drop_arena()
                self.last_error = self._workers.dead_reason or str(e)
            elif isinstance(e, PoolError) and not isinstance(e, Cancelled):
                self.last_error = str(e)
            raise

    def _request(self, msg: dict, timeout: float) -> list[dict]:
        return self._guard(lambda: self._workers.request(msg, timeout, self.interrupt_check))

    # -- requests -------------------------------------------------------------------------------
    def configure(self, config: PatchParallelConfig) -> None:
        """Set mode, warm-up, CFG split, comm dtype, and which ranks take part (`config.ranks`: a
        plan may use fewer devices than the pool has; the others sit the calls out). No restart."""
        if not config.mode.concrete:
            raise PoolError(f"mode={config.mode.value} must be planned before it reaches the pool "
                            "(distri_core.planner.plan_run)")
        if config.ranks:
            if max(config.ranks) >= self.world:
                raise PoolError(f"config.ranks={list(config.ranks)} but the pool has only ranks 0-{self.world - 1} "
                                f"on {self.devices}")
        elif config.world_size != self.world:
            raise PoolError(f"config.world_size={config.world_size} but the pool has {self.world} worker(s) on "
                            f"{self.devices}; start a pool with {config.world_size} device(s)")
        with self._lock:
            if config == self.config and self.state == "ready":
                return
            self.config = config
            if self.state == "ready":
                self._request({"op": "configure", "config": config}, self.start_timeout)

    def load_model(self, key: Hashable, spec: ModelSpec, weights, label: str | None = None) -> dict:
        """Make `key` the loaded model. Ships `weights` unless `key` is already loaded. `weights` is
        a mapping name -> tensor, a function returning one (called only when needed), or a
        `LazyWeights` (tensors produced one at a time, so the host never holds a second full
        copy). `label` names the model in status reports."""
        with self._lock:
            self._ensure()
            if key == self.model_key:
                return self.model_info
            if callable(weights) and not isinstance(weights, LazyWeights):
                weights = weights()
            if not isinstance(weights, LazyWeights):
                weights = LazyWeights.of(weights)
            self.model_key, self.model_info = None, {}  # workers drop the old model first
            msg = {"key": key, "setup": (spec.setup, dict(spec.setup_kwargs), spec.sys_path), "spec": pickle.dumps(spec)}
            timeout = self.start_timeout + weights.nbytes / 2 ** 28
            if self.weights == "shared":
                replies = self._guard(lambda: ship_shared(self._workers, msg, weights, timeout, self.interrupt_check))
            else:
                replies = self._guard(lambda: ship_chunked(self._workers, msg, weights, timeout, self.interrupt_check,
                                                           self.chunk_bytes))
            self.model_key = key
            self.model_info = {k: replies[0].get(k) for k in ("out_channels", "param_mb", "unit")}
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
            packed = wire.pack((x, timesteps, context, kwargs))
            out_c = self.model_info.get("out_channels") or x.shape[1]
            out_ref = wire.TensorRef(packed.end, (x.shape[0], out_c, x.shape[2], x.shape[3]), x.dtype)
            size = wire.aligned(packed.end + out_ref.nbytes)
            fresh_arena = self._arena is None or self._arena.size < size
            if fresh_arena:
                self._drop_arena()
                self._arena = SharedArena.create(max(size, int(size * 1.25)), "one UNet call's inputs and output")
            packed.write(self._arena)
            msg = {"op": "call", "arena": self._arena.path, "size": self._arena.size, "refs": packed.refs,
                   "tree": packed.tree, "out": out_ref, "key": key, "sync": sync}
            t1 = time.perf_counter()
            replies = self._request(msg, self.call_timeout)
            if fresh_arena:
                self._arena.unlink()  # every worker has it mapped now
            out = self._arena.view(out_ref.offset, out_ref.shape, out_ref.dtype).clone()
            t2 = time.perf_counter()
            compute = max(r["seconds"] for r in replies)
            self.calls += 1
            for p in self._workers.procs:
                p.calls += 1
            device_s = [r.get("device_s") for r in replies]
            self.last_call = {"seconds": t2 - t0, "worker_seconds": compute, "overhead_s": (t2 - t0) - compute,
                              "send_s": t1 - t0, "bytes_sent": max(r["bytes_sent"] for r in replies),
                              "collectives": max(r["collectives"] for r in replies),
                              "input_bytes": [r.get("input_bytes", 0) for r in replies],
                              "device_s": device_s,
                              # Busy time: on a GPU from CUDA events (kernel time minus the time the
                              # stream waited for a collective), else host time minus blocked time.
                              "busy_s": sum(r["device_s"] - r["wait_s"] for r in replies),
                              "wait_s": max(r["wait_s"] for r in replies),
                              "wait_s_per_rank": [r["wait_s"] for r in replies]}
            return out.to(x.device) if x.device.type != "cpu" else out

    def solo(self, x: torch.Tensor, timesteps, context=None, **kwargs) -> list[float]:
        """Every rank runs the whole call alone, at the same time, with no communication (the
        planner's compute profile): each rank's seconds, measured on its device."""
        with self._lock:
            if self.state != "ready" or self.model_key is None or self.config is None:
                raise PoolError("solo() needs a started pool with a model and a configuration")
            packed = wire.pack((x, timesteps, context, kwargs))
            arena = SharedArena.create(wire.aligned(packed.end), "one profiling call's inputs")
            try:
                packed.write(arena)
                replies = self._request({"op": "solo", "arena": arena.path, "size": arena.size, "refs": packed.refs,
                                         "tree": packed.tree}, self.call_timeout)
            finally:
                arena.unlink()
            return [r["device_s"] for r in replies]

    def probe_comm(self, sizes: tuple[int, ...] = (1 << 10, 1 << 22), repeat: int = 5) -> dict:
        """All-gather latency between every rank: median seconds per size (bytes per rank)."""
        with self._lock:
            self._ensure()
            replies = self._request({"op": "probe_comm", "sizes": list(sizes), "repeat": repeat}, self.start_timeout)
            return {"sizes": list(sizes), "seconds": [max(r["seconds_per_size"][i] for r in replies)
                                                      for i in range(len(sizes))]}

    def end_run(self) -> None:
        """Forget stale state on every rank (between runs, or after a cancelled run). A rank on the
        host's own GPU (`config.host_device`) also hands its cached memory back: the host's VAE
        decode comes next."""
        with self._lock:
            if self.state == "ready":
                light = () if self.config is None else \
                    tuple(self.config.pool_ranks[i] for i in self.config.light_ranks)

                def reset():
                    for r in range(self.world):
                        self._workers.send({"op": "reset", "release": r in light}, [r])
                    return self._workers.collect("reset", self.start_timeout, self.interrupt_check)

                self._guard(reset)
                self.runs += 1

    def release(self) -> None:
        """Give back every worker's stale state and cached GPU memory (ComfyUI freeing memory)."""
        with self._lock:
            if self.state == "ready":
                self._request({"op": "release"}, self.start_timeout)
                self.releases += 1

    def status(self) -> dict:
        """A snapshot for the GUI and diagnostics; never blocks on the workers."""
        workers = []
        for p in list(self._workers.procs):
            workers.append({"rank": p.rank, "device": p.device, "pid": p.pid, "alive": p.alive,
                            "memory": dict(p.memory), "calls": p.calls, "last_error": p.last_error})
        return {"state": self.state, "devices": list(self.devices), "backend": self.backend,
                "model_key": None if self.model_key is None else str(self.model_key),
                "model": self.model_info.get("label"), "model_mb": self.model_info.get("param_mb"), "runs": self.runs,
                "calls": self.calls, "releases": self.releases, "last_error": self.last_error, "last_call": dict(self.last_call),
                "config": None if self.config is None else {
                    "world_size": self.config.world_size, "mode": self.config.mode.value,
                    "warmup_steps": self.config.warmup_steps, "cfg_split": self.config.cfg_split,
                    "comm_dtype": self.config.comm_dtype.value, "ranks": list(self.config.pool_ranks),
                    "compile": self.config.compile.value},
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
