"""distri-doctor (or `python -m distri_core.doctor`): does patch parallelism work on this machine,
and does it pay? Runs with no ComfyUI and no weights, on a built-in random UNet.

It lists the devices, driver, torch and NCCL; how NCCL can move data between every pair of GPUs
(NVLink, PCIe peer-to-peer, or through host memory) and what that means; /dev/shm against what the
pool needs; where ComfyUI is. Then it starts the real worker pool on every device (2 CPU ranks
where there is no GPU), checks that full_sync equals one device, times a short run on one device
and on all, and ends with a verdict and the settings to use, or the fix. `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from . import zoo
from .comfyui import INSTALL_HINT, find_comfyui
from .config import PatchParallelConfig
from .gpucheck.checks import environment, pool_run
from .gpucheck.timing import inputs
from .runtime.devices import available_devices, dir_free, fmt_bytes
from .runtime.pool import LazyWeights, ModelSpec, WorkerPool
from .runtime.shipping import CHUNK_BYTES
from .runtime.shm import shm_dir

SDXL_FP16_BYTES = 5_135_000_000  # the SDXL UNet's weights in fp16: what CPU ranks share in /dev/shm


def transport(count: int) -> list[dict]:
    """How NCCL can move data between each pair of GPUs, from CUDA's peer access and the driver's
    topology matrix (nvidia-smi topo -m: NV# = NVLink; PIX/PXB/PHB/NODE/SYS = PCIe paths)."""
    matrix = {}
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
        rows = [line.split() for line in out.splitlines() if line.startswith("GPU")]
        for i, cells in enumerate(rows[:count]):
            for j in range(count):
                if 1 + j < len(cells):
                    matrix[(i, j)] = cells[1 + j]
    except (OSError, subprocess.SubprocessError):
        pass
    pairs = []
    for i in range(count):
        for j in range(i + 1, count):
            link = matrix.get((i, j), "?")
            p2p = torch.cuda.can_device_access_peer(i, j)
            if link.startswith("NV"):
                kind, meaning = f"NVLink ({link})", "fast: exact mode (full_sync) costs little more than displaced"
            elif p2p:
                kind, meaning = f"PCIe peer-to-peer ({link})", "good: displaced modes hide the exchange"
            else:
                kind, meaning = f"through host memory ({link})", ("slow: use comm_dtype fp16 and displaced modes; "
                                                                  "two GPUs with CFG do best with cfg_split")
            pairs.append({"gpus": [i, j], "peer_access": p2p, "link": link, "transport": kind, "meaning": meaning})
    return pairs


def shared_memory(devices: list[str]) -> dict:
    free = dir_free(shm_dir())
    need = 2 * CHUNK_BYTES + (64 << 20) if devices[0].startswith("cuda") else SDXL_FP16_BYTES
    what = "two weight chunks and one call's tensors" if devices[0].startswith("cuda") else \
        "one shared copy of an SDXL UNet in fp16 (CPU ranks)"
    ok = free is None or free >= need
    return {"dir": shm_dir(), "free": free, "needed": need, "for": what, "ok": ok,
            "fix": None if ok else f"give the container more shared memory (docker run --shm-size="
                                   f"{max(1, -(-need * 2 // 10 ** 9))}g) or set DISTRI_SHM_DIR to a larger directory"}


def speed(devices: list[str], model: str, size: int, dtype: torch.dtype, calls: int = 6) -> dict:
    """Seconds per UNet call on one device (this process) and on every device through the pool
    (corrected_async_gn, 1 warm-up step), median of the calls after the first two."""
    device = torch.device(devices[0])
    net = zoo.build_builtin(model, dtype=dtype, device=device)
    x, t, ctx, extra = inputs(model, 2, size, dtype, device)

    def timed(fn) -> float:
        times = []
        for _ in range(calls):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])

    with torch.inference_mode():
        one = timed(lambda: net(x, t, ctx, **extra))
    state = net.state_dict()
    weights = LazyWeights([(k, tuple(v.shape), v.dtype) for k, v in state.items()], lambda k: state[k].cpu())
    with WorkerPool(devices) as pool:
        pool.configure(PatchParallelConfig(world_size=len(devices), mode="corrected_async_gn", warmup_steps=1))
        pool.load_model(("doctor", model), ModelSpec(zoo.builtin_factory(model), zoo.builtin_config(model), dtype),
                        weights)
        many = timed(lambda: pool(x, t, ctx, **extra))
        pool.end_run()
        predicted = predictions(pool, model, x, t, ctx, extra)
    return {"model": model, "size": size, "batch": 2, "one_device_s": round(one, 4), "all_devices_s": round(many, 4),
            "devices": len(devices), "speedup": round(one / many, 2), "predicted": predicted}


PREDICT_SIZES = (1024, 2048, 4096)


def predictions(pool, model: str, x, t, ctx, extra, steps: int = 20) -> list[dict]:
    """What mode auto would do with this model at 1024^2, 2048^2 and 4096^2 (20 steps, CFG on), from
    the machine profile measured here (the planner's own measurement)."""
    from .config import PatchParallelConfig
    from .planner import RunShape, plan_run
    from .runtime.profiling import measure
    from .schedule import ddim_sigmas

    base = PatchParallelConfig(world_size=pool.world, mode="auto")
    unit = pool.model_info.get("unit") or 8
    dtype = str(x.dtype).replace("torch.", "")
    profile = measure(pool, x, t, ctx, extra, unit, model, dtype, base)
    out = []
    for size in PREDICT_SIZES:
        plan = plan_run(profile, RunShape(tuple(ddim_sigmas(steps)), 2, size // 8, size // 8, unit), base)
        out.append({"size": size, "steps": steps, "plan": plan.reason,
                    "predicted_s_per_step": round(plan.seconds_per_step, 3),
                    "one_device_s_per_step": round(plan.one_device_s, 3),
                    "predicted_speedup": round(plan.predicted_speedup, 2)})
    return out


def verdict(report: dict) -> dict:
    check, shm, pace = report.get("pool", {}), report["shared_memory"], report.get("speed", {})
    fixes = []
    if not shm["ok"]:
        fixes.append(shm["fix"])
    if check.get("status") != "pass":
        error = check.get("error", "")
        if "nccl" in error.lower():
            fixes.append("NCCL failed: start ComfyUI with NCCL_P2P_DISABLE=1 (consumer cards), give containers "
                         "--shm-size=16g, and see NCCL_DEBUG=INFO")
        return {"ok": False, "summary": f"the worker pool does not work here: {error[-300:]}", "fixes": fixes}
    cpu = report["devices"][0] == "cpu"
    gain = pace.get("speedup", 0)
    settings = {"devices": "cpu" if cpu else "auto", "mode": "auto", "cfg_split": "auto"}
    slow_links = [p for p in report.get("transport", []) if "host memory" in p["transport"]]
    if slow_links:
        settings["comm_dtype"] = "fp16"
    where = "CPU ranks (no GPU found)" if cpu else f"{len(report['devices'])} GPU(s)"
    if gain < 1.1:
        summary = (f"works on {where} (full_sync equals one device), but {gain}x on the built-in model at "
                   f"{pace.get('size')}px: multi-device pays at higher resolutions or with CFG split")
    else:
        summary = f"works on {where}: full_sync equals one device; {gain}x over one device on the built-in model"
    return {"ok": True, "summary": summary, "settings": settings, "fixes": fixes}


def run(quick: bool = False) -> dict:
    gpus = available_devices()
    devices = gpus if gpus else ["cpu", "cpu"]
    report: dict = {"env": environment(), "devices": devices,
                    "transport": transport(len(gpus)) if len(gpus) > 1 else [],
                    "shared_memory": shared_memory(devices)}
    comfy = find_comfyui()
    report["comfyui"] = {"path": str(comfy) if comfy else None, "hint": None if comfy else INSTALL_HINT}
    model, size = ("sd15", 512) if gpus else ("tiny", 256)
    dtype = torch.float16 if gpus else torch.float32
    # The speed section measures SDXL's shape on GPUs (the planner's predictions are for it); on
    # CPU ranks SDXL would take minutes per call, so the tiny model stands in (the report says so).
    speed_model, speed_size = ("sdxl", 1024) if gpus else ("tiny", 256 if quick else 512)
    try:
        report["pool"] = pool_run(devices, model=model, dtypes=("fp16" if gpus else "fp32",), size=size, kill=False)
    except Exception as e:  # noqa: BLE001 - the verdict reports it
        report["pool"] = {"status": "fail", "error": f"{type(e).__name__}: {e}"}
    if report["pool"].get("status") == "pass":
        try:
            report["speed"] = speed(devices, speed_model, speed_size, dtype)
        except Exception as e:  # noqa: BLE001
            report["speed"] = {"error": f"{type(e).__name__}: {e}"}
    report["verdict"] = verdict(report)
    return report


def text(report: dict) -> str:
    env = report["env"]
    lines = [f"torch {env['torch']}, CUDA {env.get('cuda')}, NCCL {env.get('nccl')}, driver {env.get('driver')}"]
    for g in env.get("gpus", []):
        lines.append(f"  GPU {g['index']}: {g['name']}, {g['memory_gb']} GB")
    if not env.get("gpus"):
        lines.append("  no GPU: checking with 2 CPU ranks")
    for p in report["transport"]:
        lines.append(f"  GPU {p['gpus'][0]} <-> GPU {p['gpus'][1]}: {p['transport']}: {p['meaning']}")
    shm = report["shared_memory"]
    lines.append(f"shared memory {shm['dir']}: {fmt_bytes(shm['free'] or 0)} free, {fmt_bytes(shm['needed'])} "
                 f"needed for {shm['for']}" + ("" if shm["ok"] else " -- TOO SMALL"))
    lines.append(f"ComfyUI: {report['comfyui']['path'] or 'not found'}")
    pool = report.get("pool", {})
    for dtype, d in pool.get("dtypes", {}).items():
        lines.append(f"pool on {', '.join(report['devices'])}: started in {pool.get('start_s')} s; full_sync vs one "
                     f"device ({dtype}): max diff {d['max_abs_diff']:.2g} ({'exact' if d['exact'] else 'WRONG'})")
    pace = report.get("speed", {})
    if "speedup" in pace:
        lines.append(f"speed, built-in {pace['model']} UNet at {pace['size']}px, batch 2: one device "
                     f"{pace['one_device_s']} s/call, all devices {pace['all_devices_s']} s/call: {pace['speedup']}x")
        what = "SDXL" if pace["model"] == "sdxl" else f"the built-in {pace['model']} model (SDXL needs a GPU here)"
        for p in pace.get("predicted", []):
            lines.append(f"  mode auto, {what} at {p['size']}x{p['size']}, {p['steps']} steps: {p['plan']}; "
                         f"{p['predicted_s_per_step']} s/step predicted ({p['predicted_speedup']}x)")
    v = report["verdict"]
    lines.append(("OK: " if v["ok"] else "PROBLEM: ") + v["summary"])
    if v.get("settings"):
        lines.append("use in Patch Parallel Config: " + ", ".join(f"{k}={val}" for k, val in v["settings"].items()))
    lines += [f"fix: {f}" for f in v.get("fixes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distri-doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the report as JSON (to a file, or - "
                                                                      "for stdout)")
    p.add_argument("--quick", action="store_true", help="a shorter speed measurement")
    args = p.parse_args(argv)
    report = run(args.quick)
    if args.json == "-":
        print(json.dumps(report, indent=2, default=str))
    else:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, default=str)
        print(text(report))
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
