"""`python -m distri_core.bench --plan auto`: the planner against every fixed layout, measured.

Per model, size and cfg (5: cond and uncond in one call; 1: one image): one pool of CPU ranks (or
the given GPUs) holds the built-in model and measures its machine profile as mode auto does; then,
for each step count, the DDIM loop runs in every fixed layout the pool allows (one device, all
devices exact, CFG split, displaced), each reported with its seconds per step, the planner's
prediction for it, and its final-latent error against one device. Auto's run is the layout it picks
(same ranks, mode and synchronous steps), so its measured time is that layout's.
"""

from __future__ import annotations

import logging
import os
import platform
import time

import torch

from . import zoo
from .config import Mode, PatchParallelConfig
from .planner import EXACT_AT_MOST, RunShape, displaced_sync_steps, plan_run, step_seconds
from .runtime.pool import LazyWeights, ModelSpec, WorkerPool
from .runtime.profiling import measure
from .sampling import ddim_sample
from .schedule import ddim_sigmas

log = logging.getLogger("distri_core.bench")


def _inputs(model: str, size: int, batch: int, seed: int = 0):
    h = size // 8
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 4, h, h, generator=gen)
    ctx = torch.randn(1, 77, zoo.builtin_context_dim(model), generator=gen)
    if batch == 2:
        ctx = torch.cat([ctx, torch.zeros_like(ctx)])
    return x, ctx, zoo.builtin_extra(model, batch)


def _loop(pool, x, ctx, extra, steps: int, sync_steps, guidance: float):
    times: list[float] = []
    last = [time.perf_counter()]
    batch = 2 if guidance != 1.0 else 1

    def eps_fn(xt, t, i):
        xx = torch.cat([xt, xt]) if batch == 2 else xt
        out = pool(xx, torch.full((batch,), float(t)), ctx, key=("bench",), sync=i in sync_steps, **extra)
        if batch == 1:
            return out
        c, u = out.chunk(2)
        return u + guidance * (c - u)

    def tick(i, _x):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    out = ddim_sample(eps_fn, x, steps, callback=tick)
    pool.end_run()
    return out, times


def fixed_layouts(world: int, steps: int, warmup: int, batch: int = 2) -> list[tuple[str, PatchParallelConfig]]:
    """Every fixed layout of a pool of `world` ranks: one device, all exact, CFG split (with a
    batch to split), displaced."""
    out = [("one device", PatchParallelConfig(world_size=1, ranks=(0,), mode=Mode.FULL_SYNC))]
    if world > 1:
        out.append((f"{world} devices, full_sync", PatchParallelConfig(world_size=world, mode=Mode.FULL_SYNC,
                                                                        cfg_split=False)))
        if world % 2 == 0 and batch % 2 == 0:
            out.append((f"{world} devices, CFG split, full_sync",
                        PatchParallelConfig(world_size=world, mode=Mode.FULL_SYNC, cfg_split=True)))
        out.append((f"{world} devices, corrected_async_gn",
                    PatchParallelConfig(world_size=world, mode=Mode.CORRECTED_ASYNC_GN, cfg_split=False,
                                        warmup_steps=warmup)))
    return out


def run_plan_bench(model: str, sizes: list[int], step_counts: list[int], devices: list[str], threads: int,
                   warmup: int = 4, guidances: tuple[float, ...] = (5.0, 1.0)) -> dict:
    results = []
    net = zoo.build_builtin(model)
    state = net.state_dict()
    weights = LazyWeights([(k, tuple(v.shape), v.dtype) for k, v in state.items()], lambda k: state[k])
    spec = ModelSpec(zoo.builtin_factory(model), zoo.builtin_config(model), torch.float32)
    world = len(devices)
    with WorkerPool(devices, threads=threads) as pool:
        pool.configure(PatchParallelConfig(world_size=world, mode=Mode.FULL_SYNC))
        info = pool.load_model(("plan-bench", model), spec, weights)
        unit = info["unit"]
        for size, guidance in [(z, g) for z in sizes for g in guidances]:
            batch = 2 if guidance != 1.0 else 1
            x, ctx, extra = _inputs(model, size, batch)
            base = PatchParallelConfig(world_size=world, mode=Mode.AUTO, warmup_steps=warmup)
            xx = torch.cat([x] * batch)
            profile = measure(pool, xx, torch.full((batch,), 500.0), ctx, extra, unit, model, "fp32", base)
            for steps in step_counts:
                run = RunShape(tuple(ddim_sigmas(steps)), batch, size // 8, size // 8, unit)
                plan = plan_run(profile, run, base)
                rows, ref = [], None
                layouts = fixed_layouts(world, steps, warmup, batch)
                if plan.config.band_shares:  # auto sized the bands by device speed: measure its own layout too
                    layouts.append((f"{len(plan.config.pool_ranks)} devices, bands by speed, "
                                    + ("CFG split, " if plan.config.cfg_split else "") + plan.config.mode.value,
                                    plan.config))
                for label, config in layouts:
                    pool.configure(config)
                    displaced = config.mode is not Mode.FULL_SYNC
                    sync_steps = displaced_sync_steps(run, warmup) if displaced else tuple(range(steps))
                    ranks = config.pool_ranks
                    split = bool(config.cfg_split)
                    n_sync = len(sync_steps)
                    predicted = step_seconds(profile, run, ranks, split, sync_steps, shares=config.band_shares)
                    out, times = _loop(pool, x, ctx, extra, steps, set(sync_steps), guidance)
                    if ref is None:
                        ref = out
                    d = (out - ref).abs()
                    measured = sum(times) / steps
                    rows.append({"layout": label, "ranks": list(ranks), "cfg_split": split, "mode": config.mode.value,
                                 "sync_steps": n_sync, "allowed": not displaced or steps > EXACT_AT_MOST,
                                 "measured_s_per_step": round(measured, 4), "predicted_s_per_step": round(predicted, 4),
                                 "predicted_over_measured": round(predicted / measured, 3),
                                 "mean_abs_err": float(d.mean()), "max_abs_err": float(d.max())})
                    log.info("%s %dpx cfg %g %d steps %s: %.3f s/step (predicted %.3f)", model, size, guidance, steps,
                             label, measured, predicted)
                chosen = rows[-1] if plan.config.band_shares else next(
                    r for r in rows if (tuple(r["ranks"]), r["cfg_split"], r["mode"]) ==
                    (plan.config.pool_ranks, bool(plan.config.cfg_split), plan.config.mode.value))
                results.append({
                    "model": model, "size": size, "cfg": guidance, "batch": batch, "steps": steps,
                    "auto": plan.summary()["reason"], "auto_layout": chosen["layout"],
                    "auto_predicted_s_per_step": round(plan.seconds_per_step, 4), "layouts": rows})
            results[-1]["profile"] = profile.to_json()
    return summarize({"benchmark": "distri_core.bench --plan auto", "model": model, "devices": devices,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads_per_rank": threads},
            "results": results})


def summarize(report: dict) -> dict:
    """Auto's measured time and error (its layout's), the best allowed fixed layout, the fastest
    one, per case. Layouts a case's batch cannot have (CFG split of one image) are dropped."""
    for r in report["results"]:
        if r.get("batch", 2) % 2:
            r["layouts"] = [lay for lay in r["layouts"] if not lay["cfg_split"]]
        rows = r["layouts"]
        chosen = next(lay for lay in rows if lay["layout"] == r["auto_layout"])
        best = min((lay for lay in rows if lay["allowed"]), key=lambda lay: lay["measured_s_per_step"])
        r.update(auto_measured_s_per_step=chosen["measured_s_per_step"],
                 auto_prediction_error=round(r["auto_predicted_s_per_step"] / chosen["measured_s_per_step"] - 1, 3),
                 best_allowed_layout=best["layout"], best_allowed_s_per_step=best["measured_s_per_step"],
                 auto_over_best_allowed=round(chosen["measured_s_per_step"] / best["measured_s_per_step"], 3),
                 fastest_layout=min(rows, key=lambda lay: lay["measured_s_per_step"])["layout"],
                 auto_mean_abs_err=chosen["mean_abs_err"])
    return report

