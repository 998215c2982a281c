"""One rank of the worker pool: `python -m distri_core.runtime.worker ...`, started by
`WorkerPool`. It joins the process group, then serves the host's requests read from a private
pipe: load a model, (re)configure the engine, evaluate the UNet on its band, reset, report.

It exits when the host says so, when its pipe closes, or when the host process is gone.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import wire
from .launch import watch_parent
from .shm import SharedArena

log = logging.getLogger("distri_core.worker")


def resolve(target: str) -> Any:
    """'package.module:attr' or '/path/to/file.py:attr'."""
    module_name, _, attr = target.partition(":")
    if module_name.endswith(".py"):
        name = "distri_ext_" + os.path.splitext(os.path.basename(module_name))[0]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj = module
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _memory(device: torch.device) -> dict:
    import resource

    mem = {"rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            mem["rss_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        mem["cuda_mb"] = round(torch.cuda.memory_allocated(device) / 2 ** 20, 1)
        mem["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return mem


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.rank, self.world = args.rank, args.world
        self.device = torch.device(args.device)
        self.fd_in, self.fd_out = args.fd_in, args.fd_out
        self.model = None
        self.model_key = None
        self.engine = None
        self.config = None
        self.arena: SharedArena | None = None
        self.groups = None

    def serve(self, args: argparse.Namespace) -> None:
        from .groups import build_groups

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(args.backend, init_method=f"file://{args.store}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=args.comm_timeout))
        self.groups = build_groups()
        wire.send(self.fd_out, {"ok": True, "op": "ready", "pid": os.getpid(), "memory": _memory(self.device)})
        while True:
            try:
                msg = wire.recv(self.fd_in)
            except EOFError:
                return  # the host is gone
            op = msg.get("op")
            if op == "exit":
                wire.send(self.fd_out, {"ok": True, "op": "exit"})
                return
            t0 = time.perf_counter()
            try:
                reply = getattr(self, "op_" + op)(msg)
                reply.update(ok=True, op=op)
            except BaseException as e:  # noqa: BLE001 - reported to the host, which decides
                reply = {"ok": False, "op": op, "error": f"{type(e).__name__}: {e}", "kind": type(e).__name__,
                         "traceback": traceback.format_exc()}
            reply["seconds"] = time.perf_counter() - t0
            reply["memory"] = _memory(self.device)
            wire.send(self.fd_out, reply)

    # -- requests -----------------------------------------------------------------------------
    def op_ping(self, msg: dict) -> dict:
        return {}

    def op_load(self, msg: dict) -> dict:
        self._drop_model()
        setup, setup_kwargs, paths = msg["setup"]
        for p in paths:
            if p not in sys.path:
                sys.path.insert(0, p)
        if setup:
            resolve(setup)(**setup_kwargs)
        spec = pickle.loads(msg["spec"])
        arena = SharedArena.attach(msg["arena"], msg["size"])
        names, refs = msg["names"], msg["refs"]
        state = dict(zip(names, wire.read(arena, refs), strict=True))
        factory = resolve(spec.factory)
        with torch.device("meta"):
            model = factory(**spec.kwargs)
        params = dict(model.named_parameters())
        if self.device.type == "cpu" and all(t.dtype == params[n].dtype for n, t in state.items() if n in params):
            # CPU ranks compute straight from the shared segment: one copy of the weights for all
            # of them, and no copy at all to load.
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            if left:
                raise ValueError(f"{spec.factory} has tensors the weights do not cover: {left[:5]}")
        else:
            model = model.to_empty(device=self.device)
            missing, unexpected = model.load_state_dict(state, strict=False)
        del state, arena
        if missing or unexpected:
            raise ValueError(f"weights do not fit {spec.factory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if any(p.dtype != spec.dtype for p in model.parameters()):
            model = model.to(spec.dtype)
        self.model = model.eval().requires_grad_(False)
        self.model_key = msg["key"]
        if self.config is not None:
            self._build_engine()
        config = getattr(model, "config", None)
        out_channels = getattr(config, "out_channels", None) if config is not None else getattr(model, "out_channels", None)
        return {"out_channels": out_channels, "param_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20, 1)}

    def op_configure(self, msg: dict) -> dict:
        self.config = msg["config"]
        if self.model is not None:
            self._build_engine()
        return {}

    def op_call(self, msg: dict) -> dict:
        if self.engine is None:
            raise RuntimeError("no model loaded or no configuration set")
        if self.arena is None or self.arena.path != msg["arena"]:
            self.arena = None
            self.arena = SharedArena.attach(msg["arena"], msg["size"])
        tensors = [t.to(self.device, non_blocking=True) for t in wire.read(self.arena, msg["refs"])]
        x, timesteps, context, kwargs = wire.unflatten(msg["tree"], tensors)
        before = self.engine.stats.snapshot()
        with torch.inference_mode():
            part = self.engine.forward_band(x, timesteps, context, key=msg["key"], sync=msg["sync"], **kwargs)
            ref = msg["out"]
            out = self.arena.view(ref.offset, ref.shape, ref.dtype)
            (c0, c1), (r0, r1) = part.chunk, part.rows
            out[c0:c1, :, r0:r1].copy_(part.output)
        after = self.engine.stats.snapshot()
        return {k: after[k] - before[k] for k in ("bytes_sent", "collectives", "wait_s")}

    def op_reset(self, msg: dict) -> dict:
        if self.engine is not None:
            self.engine.reset()
        return {}

    def op_status(self, msg: dict) -> dict:
        return {"model_key": self.model_key}

    # -- helpers --------------------------------------------------------------------------------
    def _build_engine(self) -> None:
        from .engine import DistriUNet

        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.engine = DistriUNet(self.model, self.config, self.groups)

    def _drop_model(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.model = self.model_key = None
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
    threading.Thread(target=watch_parent, args=(args.parent, 0.5), daemon=True).start()
    if args.threads:
        torch.set_num_threads(args.threads)
    worker = Worker(args)
    try:
        worker.serve(args)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
