"""Benchmark: a denoising loop (DDIM for UNets, flow-matching Euler for the Flux-style
transformers) on 1..N ranks and each mode, measured in one run.

    python -m distri_core.bench --model tiny --size 2048 --ranks 1,2 \\
        --modes full_sync,corrected_async_gn,naive_patch --steps 20 --json out.json

Every (ranks, mode) runs in freshly started rank processes (one torch thread each by default),
so peak memory is per configuration. The 1-rank run is the plain model, no engine: the
single-device result every other run is compared with, and the time speedups divide.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import resource
import sys
import time

import torch

from . import zoo
from .config import Compile, Mode, PatchParallelConfig
from .runtime.launch import LocalCluster
from .sampling import EULER_SCHEDULES, ddim_sample, euler_sample, flow_sample

log = logging.getLogger("distri_core.bench")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Benchmark models beyond diffusers' sizes: distri_core.dit's Flux-style transformers.
TRANSFORMERS = ("flux-tiny", "flux-small")


def build_model(name: str, seed: int, dtype: torch.dtype):
    """(module, call(module, x, t, ctx, **extra)) of a bench model."""
    if name in TRANSFORMERS:
        return zoo.build_builtin(name, seed=seed, dtype=dtype), lambda m, x, t, c, **kw: m(x, t, c, **kw)
    return zoo.build(name, seed=seed, dtype=dtype), \
        lambda m, x, t, c, **kw: m(x, t, encoder_hidden_states=c, return_dict=False, **kw)[0]


# The UNets' loops: DDIM (the default, as the paper) or ComfyUI's `euler` with a schedule.
UNET_SAMPLERS = {"ddim": ddim_sample, **{name: functools.partial(euler_sample, schedule=schedule)
                                         for name, schedule in EULER_SCHEDULES.items()}}


def sampler(name: str, kind: str = "ddim"):
    """The loop a model is run in: flow-matching Euler for the transformers (their timestep is a
    sigma in [0, 1]); for the UNets `kind` (a key of UNET_SAMPLERS), DDIM by default."""
    if name in TRANSFORMERS:
        return flow_sample
    if kind not in UNET_SAMPLERS:
        raise ValueError(f"sampler={kind!r} is not known; use one of {', '.join(UNET_SAMPLERS)}")
    return UNET_SAMPLERS[kind]


def _inputs(model_name: str, size: int, guidance: float, dtype: torch.dtype, seed: int,
            device: torch.device | str = "cpu"):
    """The loop's starting latent, text context ([cond, uncond] with CFG) and extra inputs."""
    h = w = size // 8
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, zoo.latent_channels(model_name) if model_name in TRANSFORMERS else 4, h, w,
                    generator=gen).to(device, dtype)
    batch = 2 if guidance != 1.0 else 1
    if model_name in TRANSFORMERS:
        ctx = torch.randn(1, 77, zoo.builtin_context_dim(model_name), generator=gen)
        extra = zoo.builtin_extra(model_name, batch, device)
    else:
        ctx = torch.randn(*zoo.context_shape(model_name, 1), generator=gen)
        extra = zoo.extra_inputs(model_name, batch, h, w)
    ctx = torch.cat([ctx, torch.zeros_like(ctx)]) if batch == 2 else ctx
    return x, ctx.to(device, dtype), extra, batch


def _guided(unet_call, batch: int, guidance: float, device: torch.device | str = "cpu"):
    """The DDIM loop's eps function: one UNet call on [x, x] with CFG, or on x without."""
    def eps_fn(xt, t, i):
        xx = torch.cat([xt, xt]) if batch == 2 else xt
        out = unet_call(xx, torch.full((batch,), float(t), device=device))
        if batch == 1:
            return out
        c, u = out.chunk(2)
        return u + guidance * (c - u)
    return eps_fn


def _step_timer(device: torch.device):
    """Seconds of every step (the DDIM callback), with the device's queue drained first."""
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(i, _x):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
    return times, tick


def _run(info, model_name: str, size: int, steps: int, mode: str | None, warmup: int, guidance: float,
         comm_dtype: str, dtype: str, seed: int, compile: str = "off"):
    """One denoising loop on this rank; rank 0 returns the measurements and the final latent."""
    from .runtime.engine import DistriUNet

    torch_dtype = DTYPES[dtype]
    device = torch.device(info.device)
    unet, plain = build_model(model_name, seed, torch_dtype)
    unet = unet.to(device)
    x, ctx, extra, batch = _inputs(model_name, size, guidance, torch_dtype, seed, device)

    engine = None
    if mode is not None:
        config = PatchParallelConfig(world_size=info.world, mode=mode, warmup_steps=warmup, comm_dtype=comm_dtype,
                                     compile=compile)
        engine = DistriUNet(unet, config, info.groups)

    def unet_call(xx, tt):
        if engine is None:
            return plain(unet, xx, tt, ctx, **extra)
        return engine(xx, tt, ctx, **extra)

    times, tick = _step_timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        out = sampler(model_name)(_guided(unet_call, batch, guidance, device), x, steps, callback=tick)
    stats = engine.stats.snapshot() if engine else {"bytes_sent": 0, "collectives": 0, "calls": steps * 1}
    stats["compiled_graphs"] = engine.compiled_graphs if engine else 0
    stale = engine.stale_bytes if engine else 0
    if engine:
        engine.close()
    mem = {"peak_rss_mb": round(_peak_rss_mb(), 1), "stale_mb": round(stale / 2 ** 20, 2)}
    if device.type == "cuda":
        mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    result = {"rank": info.rank, "times": times, "stats": stats, "memory": mem}
    if info.rank == 0:
        result["latent"] = out.float().cpu()
    return result


def _run_pool(n: int, args: argparse.Namespace, mode: str, compile: str = "off") -> dict:
    """The same loop, driven from this process through a WorkerPool of n CPU/GPU ranks."""
    from .runtime.pool import ModelSpec, WorkerPool

    torch_dtype = DTYPES[args.dtype]
    devices = args.devices.split(",")[:n] if args.devices else ["cpu"] * n
    x, ctx, extra, batch = _inputs(args.model, args.size, args.cfg, torch_dtype, args.seed)
    with WorkerPool(devices, threads=args.threads, call_timeout=args.timeout) as pool:
        pool.configure(PatchParallelConfig(world_size=n, mode=mode, warmup_steps=args.warmup,
                                           comm_dtype=args.comm_dtype, compile=compile))
        if args.model in TRANSFORMERS:
            spec = ModelSpec(zoo.builtin_factory(args.model), zoo.builtin_config(args.model), torch_dtype)
        else:
            spec = ModelSpec("diffusers:UNet2DConditionModel", zoo.diffusers_config(args.model), torch_dtype)
        pool.load_model((args.model, args.seed), spec, lambda: build_model(args.model, args.seed, torch.float32)[0]
                        .state_dict())
        overhead, stats = [], {"bytes_sent": 0, "collectives": 0, "calls": 0}

        def unet_call(xx, tt):
            out = pool(xx, tt, ctx, **extra)
            overhead.append(pool.last_call["overhead_s"])
            stats["bytes_sent"] += pool.last_call["bytes_sent"]
            stats["collectives"] += pool.last_call["collectives"]
            stats["calls"] += 1
            return out

        times, tick = _step_timer(torch.device("cpu"))  # the pool returns outputs on the CPU, finished
        out = sampler(args.model)(_guided(unet_call, batch, args.cfg), x, args.steps, callback=tick)
        pool.end_run()
        memory = [dict(wk["memory"]) for wk in pool.status()["workers"]]
    return {"times": times, "stats": stats, "latent": out.float(), "memory": memory,
            "overhead_s_per_call": sum(overhead) / len(overhead)}


def experiment_setup(info, model_name: str, size: int, steps: int, guidance: float, dtype: str, seed: int,
                     mode: str, sampler_kind: str = "ddim") -> dict:
    """What the experiment modules (resync_bench, extrapolate_bench) start each task with, on every
    rank: the model, the loop's inputs, the plain model's loop on this device (the reference every
    variant is judged against; every rank computes it, so none waits in a collective meanwhile)
    and an engine over the task's ranks with no warm-up of its own (the loops pass `sync`)."""
    from .runtime.engine import DistriUNet

    torch_dtype = DTYPES[dtype]
    device = torch.device(info.device)
    unet, plain = build_model(model_name, seed, torch_dtype)
    unet = unet.to(device)
    x, ctx, extra, batch = _inputs(model_name, size, guidance, torch_dtype, seed, device)
    loop = sampler(model_name, sampler_kind)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = loop(_guided(lambda xx, tt: plain(unet, xx, tt, ctx, **extra), batch, guidance, device), x, steps)
    ref_s = time.perf_counter() - t0
    engine = DistriUNet(unet, PatchParallelConfig(world_size=info.world, mode=mode, warmup_steps=0), info.groups)
    return {"x": x, "ctx": ctx, "extra": extra, "batch": batch, "loop": loop, "ref": ref, "ref_s": ref_s,
            "engine": engine, "device": device}


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out - ref).abs()
    mse = float((d ** 2).mean())
    span = float(ref.max() - ref.min())
    psnr = float("inf") if mse == 0 else 20 * math.log10(span / math.sqrt(mse))
    return {"max_abs_err": float(d.max()), "mean_abs_err": float(d.mean()),
            "psnr_db": round(psnr, 2) if math.isfinite(psnr) else None}


def _measure(args: argparse.Namespace, n: int, mode: str | None, devices: list[str] | None,
             compile: str = "off") -> tuple[dict, list]:
    """One run of one configuration: rank 0's result and every rank's memory."""
    devs = devices[:n] if devices else None
    backend = "nccl" if devs and devs[0].startswith("cuda") else "gloo"
    if args.pool and mode is not None:
        r0 = _run_pool(n, args, mode, compile)
        return r0, [{"memory": m} for m in r0["memory"]]
    with LocalCluster(n, backend=backend, devices=devs, threads=args.threads) as cluster:
        outs = cluster.run(_run, args.model, args.size, args.steps, mode, args.warmup, args.cfg, args.comm_dtype,
                           args.dtype, args.seed, compile, timeout=args.timeout)
    return outs[0], outs


def run_benchmark(args: argparse.Namespace) -> dict:
    ranks = [int(r) for r in args.ranks.split(",")]
    modes = [Mode(m).value for m in args.modes.split(",")]
    if 1 not in ranks:
        ranks = [1] + ranks  # the single-device reference is always measured
    devices = args.devices.split(",") if args.devices else None
    compiles = args.compile.split(",")
    for c in compiles:
        Compile(c)  # a clear error for a bad name before anything runs
    configs = [(n, mode, c) for n in sorted(set(ranks)) for mode in ([None] if n == 1 else modes)
               for c in (["off"] if n == 1 or mode == "full_sync" else compiles)]
    # With --repeat, the configurations run in interleaved rounds (a, b, c, a, b, c, ...) so that
    # a slow phase of a shared machine does not fall on one configuration only; times are the
    # median over rounds.
    runs: dict[tuple, list] = {c: [] for c in configs}
    for _ in range(args.repeat):
        for n, mode, c in configs:
            t0 = time.perf_counter()
            r0, outs = _measure(args, n, mode, devices, c)
            runs[(n, mode, c)].append((r0, outs, time.perf_counter() - t0))
            log.info("measured ranks=%d mode=%s compile=%s: %.4f s/step", n, mode or "single_device", c,
                     sum(r0["times"]) / args.steps)

    def median(values: list[float]) -> float:
        v = sorted(values)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    results, ref, base_time = [], None, None
    for n, mode, c in configs:
        r0, outs, wall = runs[(n, mode, c)][0]
        totals = [sum(r["times"]) for r, _, _ in runs[(n, mode, c)]]
        # After warm-up; compiled, also after the first displaced step (it compiles)
        compiling = c != "off" and n > 1 and mode is not None and Mode(mode).uses_stale
        first = min(len(r0["times"]) - 1, args.warmup + 1 + compiling)
        steady = [sum(r["times"][first:]) / len(r["times"][first:]) for r, _, _ in runs[(n, mode, c)]]
        total = median(totals)
        row = {
            "ranks": n, "mode": mode or "single_device",
            "sec_per_step": round(total / args.steps, 4),
            "sec_per_step_after_warmup": round(median(steady), 4),
            "calls_per_step": r0["stats"]["calls"] / args.steps,
            "bytes_per_step": int(r0["stats"]["bytes_sent"] / args.steps),
            "collectives_per_step": round(r0["stats"]["collectives"] / args.steps, 2),
            "memory_per_rank": [o["memory"] for o in outs],
            "wall_s": round(wall, 1),
            "via": "pool" if args.pool and mode is not None else "ranks",
        }
        row["compile"] = c
        if compiling:
            row["compile_s"] = round(median([r["times"][first - 1] - st for (r, _, _), st in
                                             zip(runs[(n, mode, c)], steady, strict=True)]), 2)
            row["compiled_graphs"] = r0["stats"].get("compiled_graphs")
        if args.repeat > 1:
            row["rounds_sec_per_step"] = [round(t / args.steps, 4) for t in totals]
            row["rounds_sec_per_step_after_warmup"] = [round(t, 4) for t in steady]
        if "overhead_s_per_call" in r0:
            row["pool_overhead_s_per_call"] = round(r0["overhead_s_per_call"], 5)
            row["pool_overhead_fraction"] = round(r0["overhead_s_per_call"] * row["calls_per_step"]
                                                  / row["sec_per_step"], 4)
        if n == 1:
            ref, base_time = r0["latent"], total
        row["speedup"] = round(base_time / total, 3)
        row.update(_errors(r0["latent"], ref))
        log.info("%s", {k: v for k, v in row.items() if k != "memory_per_rank"})
        results.append(row)
    return {
        "benchmark": "distri_core.bench",
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": sys.version.split()[0], "backend": "nccl" if devices and devices[0].startswith("cuda") else "gloo",
                    "threads_per_rank": args.threads},
        "results": results,
    }


def run_profile(args: argparse.Namespace) -> dict:
    """Operators and host time per UNet call (plain UNet, each mode's sync and displaced steps)
    at a small latent, where compute is negligible and per-call overhead shows, and at --size."""
    from .profile import profile_task

    n = max(int(r) for r in args.ranks.split(","))
    small = 16 * n  # rows: a multiple of every bench model's downsampling unit per band
    model = args.model if args.model in zoo.CONFIGS else f"builtin-{args.model}"
    modes = [Mode(m).value for m in args.modes.split(",")]
    # --compile torch_compile: the displaced modes' steps are measured compiled too.
    compiled = tuple(m for m in modes if Mode(m).uses_stale) if "torch_compile" in args.compile.split(",") else ()
    with LocalCluster(n, threads=args.threads) as cluster:
        rows = [cluster.run(profile_task, model, latent, modes, max(5, args.repeat), compiled, timeout=args.timeout)[0]
                for latent in dict.fromkeys((small, args.size // 8))]
    return {"benchmark": "distri_core.bench --profile", "args": vars(args), "profile": rows,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distri_core.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(zoo.CONFIGS) + list(TRANSFORMERS),
                   help="random-weight model (see distri_core.zoo): micro, tiny, small, sd15, sdxl (diffusers "
                        "UNets); flux-tiny, flux-small (distri_core.dit, Flux-style transformers)")
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (latent = size/8), square")
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts; 1 is always measured")
    p.add_argument("--modes", default="full_sync,corrected_async_gn,naive_patch", help="comma list of modes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every configuration this many times, in interleaved rounds; report medians")
    p.add_argument("--warmup", type=int, default=4, help="warm-up steps after the first")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale; != 1 runs a [cond, uncond] batch")
    p.add_argument("--comm-dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32, fp16, bf16")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--devices", default="", help="comma list of devices (e.g. cuda:0,cuda:1); default CPU ranks")
    p.add_argument("--compile", default="off",
                   help="comma list of off, torch_compile, cuda_graphs: each displaced mode runs with each "
                        "(Patch Parallel Config's compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one configuration may take")
    p.add_argument("--pool", action="store_true",
                   help="run the multi-rank configurations through the persistent WorkerPool (shows its overhead)")
    p.add_argument("--profile", action="store_true",
                   help="count operators and host time per UNet call instead of timing a denoising loop")
    p.add_argument("--plan", default="", choices=["", "auto"],
                   help="auto: the planner's choice and prediction against every fixed layout, measured through "
                        "the pool on the built-in model (tiny, sd15, sdxl) at --sizes and --step-counts")
    p.add_argument("--sizes", default="256,512,768", help="with --plan: comma list of image sizes")
    p.add_argument("--step-counts", default="4,8,20,50", help="with --plan: comma list of step counts")
    p.add_argument("--cfgs", default="5,1", help="with --plan: comma list of guidance scales (1 = one image a call)")
    p.add_argument("--json", default="", help="write the results here (they are also printed)")
    args = p.parse_args(argv)
    for name in ("steps", "repeat", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: use 1 or more")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.plan:
        from .plan_bench import run_plan_bench

        n = max(int(r) for r in args.ranks.split(","))
        devices = args.devices.split(",") if args.devices else ["cpu"] * n
        report = run_plan_bench(args.model, [int(v) for v in args.sizes.split(",")],
                                [int(v) for v in args.step_counts.split(",")], devices, args.threads, args.warmup,
                                tuple(float(v) for v in args.cfgs.split(",")))
    else:
        report = run_profile(args) if args.profile else run_benchmark(args)
    emit(report, args.json)
    return 0


def experiment_args(p: argparse.ArgumentParser) -> None:
    """The options every experiment module shares."""
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", default="", help="write the results here (they are also printed)")


def run_experiment_main(args: argparse.Namespace, experiment) -> int:
    """Run `experiment()` with logging on, add the arguments and wall time, print and write."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    report = experiment()
    report["args"] = vars(args)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    emit(report, args.json)
    return 0


def emit(report: dict, path: str = "") -> None:
    """Print a benchmark's JSON, and write it to `path` when one is given (every bench module)."""
    text = json.dumps(report, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
