"""Experiment: adaptive re-synchronisation against DistriFusion's fixed warm-up, at an equal
number of synchronous steps (so at equal time).

    python -m distri_core.resync_bench --json out.json

A displaced step reads activations one step old; `distri_core.schedule` gives every step's
*drift* (how much the UNet's input moved since the step before). For each loop (model, size,
sampler, steps) and each budget S of synchronous steps, three rules choose which S steps run
synchronously:

* fixed:       the first S steps (DistriFusion: step 0 plus S - 1 warm-up steps);
* adaptive:    the S steps of largest drift (step 0 always) -- "sync when drift > threshold",
               with the threshold that gives S steps;
* accumulated: sync when the drift summed since the last synchronous step (inclusive) exceeds a
               threshold, found by bisection to give S steps (or the nearest count it can; the
               actual count is recorded).

Every sync set of a loop runs in the same rank processes (`engine.reset()` between loops, the
per-call `sync` override of `DistriUNet`), and the final latent is compared with the plain model
on one device computed in the same task. Models have random weights (`distri_core.zoo`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from .bench import TRANSFORMERS, _errors, _guided, experiment_args, experiment_setup, run_experiment_main
from .runtime.launch import LocalCluster
from .schedule import ddim_sigmas, fixed_sync_steps, flow_sigmas, step_drift

log = logging.getLogger("distri_core.resync_bench")

VARIANTS = ("fixed", "adaptive", "accumulated")


# -- sync-step selection ---------------------------------------------------------------------
def loop_drift(model_name: str, steps: int) -> list[float]:
    """The schedule drift of every step of the bench loop a model runs in."""
    if model_name in TRANSFORMERS:
        return step_drift(flow_sigmas(steps), flow=True)
    return step_drift(ddim_sigmas(steps))


def select_fixed(steps: int, budget: int) -> tuple[int, ...]:
    """The first `budget` steps (DistriFusion's warm-up of budget - 1 after step 0)."""
    return fixed_sync_steps(steps, max(budget, 1) - 1)


def select_adaptive(drift: Sequence[float], budget: int) -> tuple[int, ...]:
    """The `budget` steps of largest drift, step 0 always among them (its drift is inf); ties
    go to the earlier step. Equals `schedule.adaptive_sync_steps` at a threshold between the
    budget-th and the next largest drift."""
    budget = max(1, min(budget, len(drift)))
    order = sorted(range(len(drift)), key=lambda i: (0 if i == 0 else 1, -drift[i], i))
    return tuple(sorted(order[:budget]))


def accumulated_sync_steps(drift: Sequence[float], threshold: float) -> tuple[int, ...]:
    """Step 0 runs synchronously; afterwards a step does when the drift summed over the steps
    since the last synchronous one (this step included) exceeds `threshold`."""
    if not drift:
        return ()
    chosen, acc = [0], 0.0
    for i in range(1, len(drift)):
        acc += drift[i]
        if acc > threshold:
            chosen.append(i)
            acc = 0.0
    return tuple(chosen)


def select_accumulated(drift: Sequence[float], budget: int, iters: int = 100) -> tuple[tuple[int, ...], float]:
    """(sync steps, threshold) of the accumulated rule with as close to `budget` steps as any
    threshold gives (the count falls as the threshold grows; bisection). Ties between a count
    above and one below the budget go to the one below (no more time than the others)."""
    if not drift:
        return (), 0.0
    total = sum(d for d in drift[1:])
    lo, hi = 0.0, total + 1.0  # count(lo) = every step with a positive drift, count(hi) = 1
    if len(accumulated_sync_steps(drift, lo)) <= budget:
        return accumulated_sync_steps(drift, lo), lo
    for _ in range(iters):  # invariant: count(lo) > budget >= count(hi)
        mid = (lo + hi) / 2
        if len(accumulated_sync_steps(drift, mid)) > budget:
            lo = mid
        else:
            hi = mid
    below, above = accumulated_sync_steps(drift, hi), accumulated_sync_steps(drift, lo)
    if budget - len(below) <= len(above) - budget:
        return below, hi
    return above, lo


def sync_plans(drift: Sequence[float], budgets: Sequence[int]) -> list[dict]:
    """Every (budget, variant) plan: its sync steps and the threshold that gives them."""
    steps, plans = len(drift), []
    for budget in budgets:
        adaptive = select_adaptive(drift, budget)
        rest = sorted((drift[i] for i in range(1, steps) if i not in adaptive), reverse=True)
        acc, acc_threshold = select_accumulated(drift, budget)
        plans += [
            {"budget": budget, "variant": "fixed", "sync_steps": select_fixed(steps, budget), "threshold": None},
            {"budget": budget, "variant": "adaptive", "sync_steps": adaptive,
             "threshold": rest[0] if rest else 0.0},  # "sync when drift > threshold"
            {"budget": budget, "variant": "accumulated", "sync_steps": acc, "threshold": acc_threshold},
        ]
    return plans


# -- the loops -------------------------------------------------------------------------------
def resync_task(info, model_name: str, size: int, steps: int, sync_sets: Sequence[Sequence[int]], mode: str,
                guidance: float = 1.0, seed: int = 0, dtype: str = "fp32"):
    """On every rank: the plain model's loop (the one-device reference), then one engine loop per
    sync set in the same process, the engine reset between them. Rank 0 returns the reference
    latent, every set's final latent and the seconds of each loop."""
    e = experiment_setup(info, model_name, size, steps, guidance, dtype, seed, mode)
    x, ctx, extra, batch, loop, ref, ref_s, engine, device = (e[k] for k in (
        "x", "ctx", "extra", "batch", "loop", "ref", "ref_s", "engine", "device"))
    latents, seconds = [], []
    try:
        for sync_set in sync_sets:
            chosen = frozenset(int(i) for i in sync_set)
            step = [0]

            def unet_call(xx, tt, chosen=chosen, step=step):
                return engine(xx, tt, ctx, sync=step[0] in chosen, **extra)

            guided = _guided(unet_call, batch, guidance, device)

            def eps_fn(xt, t, i, guided=guided, step=step):
                step[0] = i
                return guided(xt, t, i)

            engine.reset()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = loop(eps_fn, x, steps)
            seconds.append(time.perf_counter() - t0)
            latents.append(out.float().cpu())
    finally:
        engine.close()
    if info.rank != 0:
        return None
    return {"reference": ref.float().cpu(), "latents": latents, "seconds": seconds, "reference_s": ref_s}


def run_loops(model_name: str, size: int, steps: int, sync_sets: Sequence[Sequence[int]], *, ranks: int = 2,
              mode: str = "corrected_async_gn", guidance: float = 1.0, seed: int = 0, threads: int = 1,
              timeout: float = 3600.0, cluster: LocalCluster | None = None) -> dict:
    """`resync_task` on `ranks` local CPU ranks; adds every set's errors against one device."""
    if cluster is None:
        with LocalCluster(ranks, threads=threads) as own:
            return run_loops(model_name, size, steps, sync_sets, ranks=ranks, mode=mode, guidance=guidance,
                             seed=seed, threads=threads, timeout=timeout, cluster=own)
    r0 = cluster.run(resync_task, model_name, size, steps, [tuple(s) for s in sync_sets], mode, guidance, seed,
                     timeout=timeout)[0]
    r0["errors"] = [_errors(out, r0["reference"]) for out in r0["latents"]]
    return r0


def run_experiment(loops: Sequence[tuple], budgets: Sequence[int], *, ranks: int = 2,
                   mode: str = "corrected_async_gn", seed: int = 0, threads: int = 1,
                   timeout: float = 3600.0) -> dict:
    results = []
    with LocalCluster(ranks, threads=threads) as cluster:
        for model_name, size, steps, *own in loops:
            drift = loop_drift(model_name, steps)
            plans = sync_plans(drift, [b for b in (own[0] if own else budgets) if b <= steps])
            unique = list(dict.fromkeys(p["sync_steps"] for p in plans))  # identical sets run once
            t0 = time.perf_counter()
            run = run_loops(model_name, size, steps, unique, ranks=ranks, mode=mode, seed=seed,
                            timeout=timeout, cluster=cluster)
            wall = time.perf_counter() - t0
            ref_scale = float(run["reference"].abs().mean())
            rows = []
            for p in plans:
                k = unique.index(p["sync_steps"])
                err = run["errors"][k]
                rows.append({**p, "sync_steps": list(p["sync_steps"]), "sync_count": len(p["sync_steps"]),
                             "mean_abs_err": err["mean_abs_err"], "max_abs_err": err["max_abs_err"],
                             "psnr_db": err["psnr_db"],
                             "rel_mean_abs_err": err["mean_abs_err"] / ref_scale if ref_scale else None,
                             "loop_s": round(run["seconds"][k], 2)})
            entry = {"model": model_name, "size": size, "latent": size // 8, "steps": steps,
                     "sampler": "flow_euler" if model_name in TRANSFORMERS else "ddim",
                     "drift": [None if math.isinf(d) else round(d, 5) for d in drift],
                     "reference_mean_abs": ref_scale, "reference_s": round(run["reference_s"], 2),
                     "wall_s": round(wall, 1), "results": rows}
            log.info("%s %d px, %d steps: %.1f s", model_name, size, steps, wall)
            for r in rows:
                log.info("  S=%d %-11s n=%d mean %.4g max %.4g %s", r["budget"], r["variant"], r["sync_count"],
                         r["mean_abs_err"], r["max_abs_err"], r["sync_steps"])
            results.append(entry)
    return {"benchmark": "distri_core.resync_bench", "mode": mode, "ranks": ranks, "seed": seed,
            "budgets": list(budgets),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "python": sys.version.split()[0], "backend": "gloo", "threads_per_rank": threads},
            "loops": results, "summary": summarize(results)}


def summarize(loops: Sequence[dict]) -> list[dict]:
    """Per loop and budget: each variant's mean_abs_err relative to fixed (< 1: better)."""
    out = []
    for entry in loops:
        by_budget: dict[int, dict] = {}
        for r in entry["results"]:
            by_budget.setdefault(r["budget"], {})[r["variant"]] = r
        for budget, row in by_budget.items():
            base = row["fixed"]["mean_abs_err"]
            out.append({"loop": f"{entry['model']}/{entry['size']}/{entry['sampler']}{entry['steps']}",
                        "budget": budget,
                        **{f"{v}_mean_abs_err": row[v]["mean_abs_err"] for v in VARIANTS},
                        **{f"{v}_vs_fixed": (row[v]["mean_abs_err"] / base if base else None) for v in VARIANTS[1:]},
                        "accumulated_count": row["accumulated"]["sync_count"]})
    return out


def _parse_loops(text: str) -> list[tuple]:
    """model:size:steps[:b1/b2/...] items (the budgets of that loop only) -> loop tuples."""
    loops = []
    for item in text.split(","):
        model, size, steps, *budgets = item.split(":")
        loop = (model, int(size), int(steps))
        loops.append(loop + (tuple(int(b) for b in budgets[0].split("/")),) if budgets else loop)
    return loops


# sd15 at 256 px takes ~5.5 s a step on one CPU thread a rank: 10 steps and three budgets only.
DEFAULT_LOOPS = "tiny:512:20,tiny:512:50,flux-tiny:512:20,sd15:256:10:2/3/5"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distri_core.resync_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--loops", default=DEFAULT_LOOPS,
                   help="comma list of model:size_px:steps[:b1/b2/..] (UNets run DDIM, flux-* flow-matching "
                        "Euler; the optional budgets replace --budgets for that loop)")
    p.add_argument("--budgets", default="2,3,5,8", help="comma list of sync-step counts")
    p.add_argument("--mode", default="corrected_async_gn")
    experiment_args(p)
    args = p.parse_args(argv)
    return run_experiment_main(args, lambda: run_experiment(
        _parse_loops(args.loops), [int(b) for b in args.budgets.split(",")], ranks=args.ranks, mode=args.mode,
        seed=args.seed, threads=args.threads, timeout=args.timeout))


if __name__ == "__main__":
    sys.exit(main())
