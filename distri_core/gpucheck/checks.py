"""The GPU check's runs through the real worker pool: NCCL over every visible GPU (rendezvous,
communicators, a full UNet, a worker killed mid-run, the next run), and several ranks on one GPU
through gloo (the multi-rank CUDA code on a one-GPU machine)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time

import torch

from .. import zoo
from ..config import PatchParallelConfig
from ..runtime.errors import WorkerError
from ..runtime.pool import LazyWeights, ModelSpec, WorkerPool
from .timing import inputs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def environment() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if not torch.cuda.is_available():
        return info
    info["cuda"] = torch.version.cuda
    try:
        info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError):
        info["nccl"] = None
    info["gpus"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 1e9, 1),
                             "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def _weights(model: torch.nn.Module) -> LazyWeights:
    state = model.state_dict()
    return LazyWeights([(k, tuple(v.shape), v.dtype) for k, v in state.items()], lambda k: state[k].detach().cpu())


def _compare(out: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor) -> dict:
    """The split's error next to the rounding of the dtype itself (one device in this dtype
    against one device in float32): full_sync passes when it is within that rounding."""
    scale = float(ref32.abs().max())
    split = float((out.float() - ref.float()).abs().max())
    rounding = float((ref.float() - ref32).abs().max())
    exact = split <= max(2.0 * rounding, 1e-4 * scale)
    return {"max_abs_diff": split, "rounding_of_dtype": rounding, "output_scale": scale,
            "max_rel_diff": split / max(scale, 1e-12), "exact": exact}


def pool_run(devices: list[str], *, backend: str | None = None, share_devices: bool = False, model: str = "sd15",
             dtypes: tuple[str, ...] = ("fp16",), size: int = 512, kill: bool = True) -> dict:
    """full_sync through a WorkerPool on `devices` equals one device (on the host's first
    device), per dtype; optionally a worker killed mid-run and a correct run after it."""
    device = torch.device(devices[0] if devices[0] != "cpu" else "cpu")
    result: dict = {"devices": devices, "backend": backend or ("nccl" if device.type == "cuda" else "gloo"),
                    "model": model, "size": size, "dtypes": {}}
    t0 = time.perf_counter()
    pool = WorkerPool(devices, backend=backend, share_devices=share_devices, call_timeout=600)
    try:
        pool.start()
        result["start_s"] = round(time.perf_counter() - t0, 2)  # spawn, rendezvous, communicators, collectives
        # Every rank on bands of the whole batch (no CFG split): the exchanges are what is checked.
        pool.configure(PatchParallelConfig(world_size=len(devices), mode="full_sync", cfg_split=False))
        for name in dtypes:
            dtype = DTYPES[name]
            reference = zoo.build_builtin(model, seed=0, dtype=torch.float32, device=device)
            x, t, ctx, extra = inputs(model, 2, size, torch.float32, device)
            with torch.inference_mode():
                ref32 = reference(x, t, ctx, **extra).float()
                reference = reference.to(dtype)
                low = [v.to(dtype) if v.is_floating_point() else v for v in (x, ctx)]
                lextra = {k: v.to(dtype) for k, v in extra.items()}
                ref = reference(low[0], t, low[1], **lextra)
            spec = ModelSpec(zoo.builtin_factory(model), zoo.builtin_config(model), dtype)
            t1 = time.perf_counter()
            pool.load_model((model, name), spec, _weights(reference))
            load_s = time.perf_counter() - t1
            calls = []
            for _ in range(2):
                t2 = time.perf_counter()
                out = pool(low[0], t, low[1], **lextra)
                calls.append(round(time.perf_counter() - t2, 3))
            result["dtypes"][name] = {"load_s": round(load_s, 2), "call_s": calls, **_compare(out, ref, ref32),
                                      "bytes_per_call": pool.last_call["bytes_sent"]}
            del reference
            if "displaced" not in result:
                result["displaced"] = _displaced_modes(pool, (low[0], t, low[1]), lextra, ref, ref32)
            if kill:
                result["kill"] = _kill_mid_run(pool, (low[0], t, low[1]), lextra)
                pool.load_model((model, name), spec, _weights(zoo.build_builtin(model, seed=0, dtype=dtype,
                                                                                 device=device)))
                again = pool(low[0], t, low[1], **lextra)
                result["kill"]["next_run"] = _compare(again, ref, ref32)
                kill = False
        result["workers"] = pool.status()["workers"]
    finally:
        pool.close()
    ok = all(d["exact"] for d in result["dtypes"].values())
    ok = ok and all(c["exact"] for calls in result.get("displaced", {}).values() for c in calls)
    if "kill" in result:
        ok = ok and result["kill"]["detected"] and result["kill"]["next_run"]["exact"]
    result["status"] = "pass" if ok else "fail"
    return result


def _displaced_modes(pool: WorkerPool, args, extra, ref: torch.Tensor, ref32: torch.Tensor) -> dict:
    """Displaced steps of an unchanged input equal one device (the stale activations are this
    step's): corrected_async_gn and corrected_extrapolated over the pool's backend, four calls
    each (one exact, three displaced: the extrapolating storages take turns on the device, and
    the factor is computed there). The pool is left in full_sync, as it was."""
    out = {}
    config = pool.config
    try:
        for mode in ("corrected_async_gn", "corrected_extrapolated"):
            pool.end_run()
            pool.configure(PatchParallelConfig(world_size=pool.world, mode=mode, warmup_steps=0, cfg_split=False))
            out[mode] = [_compare(pool(*args, **extra), ref, ref32) for _ in range(4)]
    finally:
        pool.end_run()
        pool.configure(config)
    return out


def _kill_mid_run(pool: WorkerPool, args, extra) -> dict:
    """SIGKILL the last worker while calls run: the call must fail naming it, fast."""
    import signal

    victim = pool.status()["workers"][-1]
    killed_at = []

    def kill():
        killed_at.append(time.perf_counter())
        os.kill(victim["pid"], signal.SIGKILL)

    timer = threading.Timer(0.2, kill)
    timer.start()
    error = None
    try:
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            pool(*args, **extra)
    except WorkerError as e:
        error = e
    timer.cancel()
    detected = error is not None and error.rank == victim["rank"] and "died" in str(error)
    return {"detected": detected, "error": str(error) if error else "no error within 60 s",
            "seconds_to_error": round(time.perf_counter() - killed_at[0], 2) if killed_at and error else None,
            "pool_state_after": pool.state}
