"""One rank of the worker pool: `python -m distri_core.runtime.worker ...`, started by
`runtime.procs.Workers`. It joins the process group (communicators created and checked before
it says it is ready), then serves the host's requests read from a private pipe: load a model,
(re)configure the engine, evaluate the UNet on its band, reset, release memory, run a task.

It exits when the host says so, when its pipe closes, or when the host process is gone.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from . import wire
from .comm import all_gather_rows
from .groups import RankInfo, build_groups, touch_groups
from .loader import build_on_meta, device_memory, finish_model, resolve, shared_model
from .shipping import Receiver
from .shm import SharedArena
from .stats import Clock

log = logging.getLogger("distri_core.worker")


def watch_parent(parent: int, interval: float = 1.0, store: str | None = None) -> None:
    """Exit this process as soon as `parent` is no longer its parent (the parent died and the
    process was re-parented); run it in a daemon thread. With `store`, remove the rendezvous
    store's directory first (rank 0 does: the dead host cannot)."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            if store:
                shutil.rmtree(os.path.dirname(store), ignore_errors=True)
            os._exit(3)


def to_device(value, device: torch.device):
    """Tensors in nested dicts/lists/tuples moved to `device`, and their bytes (what crosses from
    host memory to a GPU; counted on CPU ranks too, where the move is free)."""
    moved = [0]

    def walk(v):
        if isinstance(v, torch.Tensor):
            moved[0] += v.numel() * v.element_size()
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value), moved[0]


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.rank, self.world = args.rank, args.world
        self.device = torch.device(args.device)
        self.fd_in, self.fd_out = args.fd_in, args.fd_out
        self.model = None
        self.model_key = None
        self.spec = None
        self.engine = None
        self.config = None
        self.arena: SharedArena | None = None
        self.groups = None  # the groups of the current configuration's ranks (None: this rank sits out)
        self.rank_groups: dict[tuple[int, ...], object] = {}  # every rank set asked for so far
        self.receiver: Receiver | None = None
        self.pending_model = None

    def serve(self, args: argparse.Namespace) -> bool:
        """Serve requests until told to exit (returns False) or the host is gone (True)."""
        options = {}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if args.backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
                options["device_id"] = self.device  # communicators are created now (torch 2.3+); touch_groups checks
        dist.init_process_group(args.backend, init_method=f"file://{args.store}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=args.comm_timeout), **options)
        self.groups = build_groups()
        touch_groups(self.groups, self.device)
        self.rank_groups[tuple(range(self.world))] = self.groups
        wire.send(self.fd_out, {"ok": True, "op": "ready", "pid": os.getpid(), "memory": device_memory(self.device)})
        while True:
            try:
                msg = wire.recv(self.fd_in)
            except EOFError:
                return True  # the host is gone
            op = msg.get("op")
            if op == "exit":
                wire.send(self.fd_out, {"ok": True, "op": "exit"})
                return False
            t0 = time.perf_counter()
            try:
                reply = getattr(self, "op_" + op)(msg)
                reply.update(ok=True, op=op)
            except BaseException as e:  # noqa: BLE001 - reported to the host, which decides
                reply = {"ok": False, "op": op, "error": f"{type(e).__name__}: {e}", "kind": type(e).__name__,
                         "traceback": traceback.format_exc()}
            reply["seconds"] = time.perf_counter() - t0
            reply["memory"] = device_memory(self.device)
            wire.send(self.fd_out, reply)

    # -- requests -----------------------------------------------------------------------------
    def op_ping(self, msg: dict) -> dict:
        return {}

    def op_load(self, msg: dict) -> dict:
        """The shared path: compute straight from the host's segment (CPU ranks)."""
        self._drop_model()
        spec = self._spec(msg)
        arena = SharedArena.attach(msg["arena"], msg["size"])
        state = dict(zip(msg["names"], wire.read(arena, msg["refs"]), strict=True))
        model = shared_model(spec, state, self.device)
        del state, arena
        return self._use_model(model, spec, msg["key"])

    def op_load_begin(self, msg: dict) -> dict:
        """The chunked path: allocate the model on this device; the weights follow in pieces."""
        self._drop_model()
        spec = self._spec(msg)
        model = build_on_meta(spec)
        model = finish_model(model, spec, self.device, allocate=True)
        targets = dict(model.state_dict(keep_vars=True))
        self.receiver = Receiver({n: t.data for n, t in targets.items()}, msg["names"])
        self.pending_model = (model, spec, msg["key"])
        return {}

    def op_load_chunk(self, msg: dict) -> dict:
        if self.receiver is None:
            raise RuntimeError("load_chunk without load_begin")
        self.receiver.take(msg["arena"], msg["size"], msg["pieces"])
        return {}

    def op_load_end(self, msg: dict) -> dict:
        if self.receiver is None or self.pending_model is None:
            raise RuntimeError("load_end without load_begin")
        receiver, (model, spec, key) = self.receiver, self.pending_model
        self.receiver = self.pending_model = None
        receiver.finish()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._use_model(model, spec, key)

    def op_configure(self, msg: dict) -> dict:
        self.config = msg["config"]
        self.groups = self._groups_for(self.config.pool_ranks)
        if self.model is not None:
            self._build_engine()
        return {}

    def _groups_for(self, ranks) -> object:
        """The process groups of a set of ranks (None on ranks outside it). Every rank takes part
        in creating a set's groups the first time it is asked for, in the order the host asks, as
        torch requires; members then run one collective on them (NCCL builds communicators)."""
        ranks = tuple(ranks)
        if ranks not in self.rank_groups:
            groups = build_groups(ranks)
            if groups is not None:
                touch_groups(groups, self.device)
            self.rank_groups[ranks] = groups
        return self.rank_groups[ranks]

    @property
    def sits_out(self) -> bool:
        """This rank is not one of the current configuration's ranks."""
        return self.config is not None and self.rank not in self.config.pool_ranks

    def op_call(self, msg: dict) -> dict:
        # Every rank maps the call's segment, also one that sits this configuration out: the host
        # unlinks a new segment once all ranks replied, and a later plan may need this rank.
        if self.arena is None or self.arena.path != msg["arena"]:
            self.arena = None
            self.arena = SharedArena.attach(msg["arena"], msg["size"])
        if self.sits_out:
            return {"bytes_sent": 0, "collectives": 0, "wait_s": 0.0, "input_bytes": 0, "device_s": 0.0, "idle": True}
        if self.engine is None:
            raise RuntimeError("no model loaded or no configuration set")
        views = wire.read(self.arena, msg["refs"])
        x, timesteps, context, kwargs = wire.unflatten(msg["tree"], views)
        before = self.engine.stats.snapshot()
        with torch.inference_mode():
            # Cut to this rank's batch chunk and band while still in host memory: only the band
            # of a ControlNet residual crosses to the GPU.
            call = self.engine.prepare(x, timesteps, context, key=msg["key"], sync=msg["sync"], **kwargs)
            call, moved = call.to(self.device, to_device)
            clock = self.engine.stats.clock(self.device)
            part = self.engine.forward_prepared(call)
            ref = msg["out"]
            out = self.arena.view(ref.offset, ref.shape, ref.dtype)
            (c0, c1), (r0, r1) = part.chunk, part.rows
            out[c0:c1, :, r0:r1].copy_(part.output)
            device_s = clock.stop()
        self.engine.stats.settle()
        after = self.engine.stats.snapshot()
        reply = {k: after[k] - before[k] for k in ("bytes_sent", "collectives", "wait_s")}
        reply.update(input_bytes=moved, device_s=device_s)
        return reply

    def op_solo(self, msg: dict) -> dict:
        """The whole call on this rank alone, no communication (the planner's compute profile)."""
        if self.model is None or self.engine is None and not self.sits_out:
            raise RuntimeError("no model loaded or no configuration set")
        arena = SharedArena.attach(msg["arena"], msg["size"])
        x, timesteps, context, kwargs = wire.unflatten(msg["tree"], wire.read(arena, msg["refs"]))
        from ..surgery.adapters import adapter_for

        with torch.inference_mode():
            (x, timesteps, context, kwargs), _ = to_device((x, timesteps, context, kwargs), self.device)
            del arena
            clock = Clock(self.device)
            adapter_for(self.model)(self.model, x, timesteps, context, **kwargs)
            seconds = clock.stop()
        return {"device_s": seconds}

    def op_probe_comm(self, msg: dict) -> dict:
        """All-gather over every rank at each size (bytes per rank): median seconds."""
        results = []
        for size in msg["sizes"]:
            rows = torch.ones(self.world, max(1, size // 4), dtype=torch.float32, device=self.device)
            times = []
            for i in range(msg["repeat"] + 1):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                all_gather_rows(rows, self.rank, None)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i:
                    times.append(time.perf_counter() - t0)
            times.sort()
            results.append(times[len(times) // 2])
        return {"seconds_per_size": results}

    def op_reset(self, msg: dict) -> dict:
        if self.engine is not None:
            self.engine.reset()
        if msg.get("release"):
            self._release()
        return {}

    def op_release(self, msg: dict) -> dict:
        """Give memory back: stale state and, on a GPU, the allocator's cached blocks."""
        return self.op_reset({"release": True})

    def op_task(self, msg: dict) -> dict:
        """Run a function on ranks 0..size-1 (LocalCluster). Every rank takes part in creating a
        sub-world's groups the first time that size is asked for, as torch requires."""
        size = msg["size"]
        groups = self._groups_for(range(size))
        if self.rank >= size:
            return {"value": None}
        fn, args, kwargs = pickle.loads(msg["task"])
        value = fn(RankInfo(self.rank, size, groups, str(self.device)), *args, **kwargs)
        return {"value": value}

    def op_status(self, msg: dict) -> dict:
        return {"model_key": self.model_key}

    # -- helpers --------------------------------------------------------------------------------
    def _spec(self, msg: dict):
        setup, setup_kwargs, paths = msg["setup"]
        for p in paths:
            if p not in sys.path:
                sys.path.insert(0, p)
        if setup:
            resolve(setup)(**setup_kwargs)
        # The spec's kwargs may name classes of the host application: unpickled only after setup.
        return pickle.loads(msg["spec"])

    def _use_model(self, model, spec, key) -> dict:
        self.model, self.spec, self.model_key = model, spec, key
        if self.config is not None:
            self._build_engine()
        from ..surgery.adapters import adapter_for
        from ..surgery.walk import downsample_unit

        adapter = adapter_for(model)
        return {"out_channels": adapter.output_channels(model),
                "unit": max(downsample_unit(model), adapter.min_unit(model)),
                "param_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20, 1)}

    def _build_engine(self) -> None:
        from .engine import DistriUNet

        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.sits_out:
            return
        accessor = resolve(self.spec.accessor) if self.spec.accessor else None
        self.engine = DistriUNet(self.model, self.config, self.groups, weights=accessor)

    def _drop_model(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.model = self.model_key = self.spec = None
        self.receiver = self.pending_model = None
        self._release()

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distri_core.runtime.worker")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--fd-in", type=int, required=True)
    p.add_argument("--fd-out", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--comm-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    os.environ["DISTRI_RANK"] = str(args.rank)
    os.environ["DISTRI_DEVICE"] = args.device
    logging.basicConfig(level=logging.INFO, format=f"distri_core.worker[{args.rank}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the host's terminal is the host's
    store = args.store if args.rank == 0 else None
    threading.Thread(target=watch_parent, args=(args.parent, 0.5, store), daemon=True).start()
    if args.threads:
        torch.set_num_threads(args.threads)
    worker = Worker(args)
    host_gone = False
    try:
        host_gone = worker.serve(args)
    except BaseException as e:  # noqa: BLE001
        try:
            wire.send(args.fd_out, {"ok": False, "op": "fatal", "error": f"{type(e).__name__}: {e}",
                                    "kind": type(e).__name__, "traceback": traceback.format_exc()})
        except OSError:
            pass
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if host_gone and store:
            shutil.rmtree(os.path.dirname(store), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
