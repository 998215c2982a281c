"""Experiment: stale K/V and halos extrapolated along the sigma schedule from the last two received
versions, against plain `corrected_async_gn` (DistriFusion), at equal traffic.

    python -m distri_core.extrapolate_bench --json out.json

A displaced step i reads the other bands' activations of step i - 1 (X_{i-1}, computed at
sigma_{i-1}) where the exact model would use X_i. Keeping one more version (X_{i-2}) costs memory
but no traffic, and allows a first-order prediction

    X_i ~ X_{i-1} + f * (X_{i-1} - X_{i-2}),   f = (sigma_i - sigma_{i-1}) / (sigma_{i-1} - sigma_{i-2})

clamped to [0, 1] (f = 0 while there is no X_{i-2}). `ExperimentBuffers` (a `StaleBuffers`)
does this for the other ranks' parts only; this rank's part stays the received (own stale) one,
which the layers replace with the fresh tensor (K/V, halos) or use as the stale reference of the
GroupNorm correction. X_{i-2} is also recorded on synchronous steps (the warm-up), so the first
displaced step already extrapolates; synchronous steps themselves are never changed.

Variants per loop (all in the same rank processes, `engine.reset()` between them, the buffers class
swapped on the engine): plain `corrected_async_gn`; `extrapolated` (K/V and conv halos, f);
`extrapolated_damped` (f / 2); `extrapolated_gn` (f, GroupNorm statistics extrapolated as well);
`extrapolated_t` (K/V and halos, f computed from the timesteps the model is given instead of the
sigmas: the rule an engine can apply by itself, from its own calls, with nothing from the
sampler); `corrected_extrapolated`, the engine's mode that ships that rule (runtime.extrapolation:
per bucket, f on the device), which should give what `extrapolated_t` gives up to float32
rounding of f (the engine refuses it on flow models, where it lost: those loops skip it). The
UNets run DDIM or ComfyUI's `euler` (`simple` or `karras` schedule), the transformers
flow-matching Euler.
A `probe` loop runs every step synchronously and measures, along the exact trajectory, how far the
stale and the extrapolated versions are from the fresh activations, per kind of exchange (the
prediction error the displaced steps would start from); the extrapolating variants' own displaced
loops are probed the same way (each version that arrives against what was predicted for it one
step earlier, from the versions this rank had). Models have random weights
(`distri_core.zoo`); the error is the final latent's mean |diff| against the plain model on one
device, computed in the same task.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .bench import TRANSFORMERS, UNET_SAMPLERS, _errors, _guided, experiment_args, experiment_setup, run_experiment_main
from .config import Mode
from .runtime.comm import StaleBuffers, _Entry
from .runtime.launch import LocalCluster
from .sampling import EULER_SCHEDULES, ddim_timesteps, euler_schedule
from .schedule import ddim_sigmas, fixed_sync_steps, flow_sigmas

log = logging.getLogger("distri_core.extrapolate_bench")

# name -> (scale of the factor, None = plain StaleBuffers; extrapolate GroupNorm statistics too)
VARIANTS: dict[str, tuple[float | None, bool]] = {
    "corrected_async_gn": (None, False),
    "extrapolated": (1.0, False),
    "extrapolated_damped": (0.5, False),
    "extrapolated_gn": (1.0, True),
    "extrapolated_t": (1.0, False),
    Mode.CORRECTED_EXTRAPOLATED.value: (None, False),
}
TIMESTEP_VARIANTS = frozenset({"extrapolated_t"})  # the factor from the model's timesteps
MODE_VARIANTS = frozenset({Mode.CORRECTED_EXTRAPOLATED.value})  # an engine mode, not this module's buffers
KINDS = ("kv", "halo", "gn")


# -- the factor --------------------------------------------------------------------------------
def loop_schedule(model_name: str, steps: int, kind: str = "ddim") -> tuple[list[float], list[float]]:
    """(sigmas, timesteps) of the bench loop a model runs in, steps + 1 values each (the last 0):
    the sigma of every step, and the timestep the model is given there (the sigma for the
    transformers, the training timestep for the UNets). `kind`: the UNets' sampler
    (bench.UNET_SAMPLERS)."""
    if model_name in TRANSFORMERS:
        sigmas = flow_sigmas(steps)
        return sigmas, sigmas
    if kind == "ddim":
        return ddim_sigmas(steps), [float(t) for t in ddim_timesteps(steps)] + [0.0]
    sigmas, timesteps = euler_schedule(steps, EULER_SCHEDULES[kind])
    return sigmas, timesteps + [0.0]


def loop_sigmas(model_name: str, steps: int, kind: str = "ddim") -> list[float]:
    """The sigmas of `loop_schedule`."""
    return loop_schedule(model_name, steps, kind)[0]


def extrapolation_factors(sigmas: Sequence[float]) -> list[float]:
    """f_i = (s_i - s_{i-1}) / (s_{i-1} - s_{i-2}) clamped to [0, 1], for every step i of a
    schedule of len(sigmas) - 1 steps; 0 for steps 0 and 1 (no two earlier versions)."""
    s = [float(v) for v in sigmas]
    out = []
    for i in range(len(s) - 1):
        if i < 2 or s[i - 1] == s[i - 2]:
            out.append(0.0)
            continue
        f = (s[i] - s[i - 1]) / (s[i - 1] - s[i - 2])
        out.append(min(max(f, 0.0), 1.0))
    return out


# -- the buffers -------------------------------------------------------------------------------
@dataclass
class Extrapolation:
    """What the loop tells the buffers: this step's factor (set before each call), a constant
    scale on it (damping), and which exchanges to extrapolate. `kinds` maps a layer's exchange
    name to "kv", "halo" or "gn" (from the engine's installed layers). `probe`, when a dict,
    collects prediction errors on synchronous steps (see `ExperimentBuffers`)."""

    scale: float = 1.0
    include_gn: bool = False
    factor: float = 0.0
    kinds: dict[str, str] = field(default_factory=dict)
    probe: dict | None = None
    displaced_probe: dict | None = None
    probe_scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    step: int = 0

    @property
    def effective(self) -> float:
        return self.factor * self.scale


def layer_kinds(installed) -> dict[str, str]:
    """Exchange name -> kind, for the layers an engine installed."""
    from .layers.attention import DistriKV
    from .layers.conv import DistriConv2d
    from .layers.groupnorm import DistriGroupNorm
    from .layers.joint_attention import DistriJointAttention

    kinds = {}
    for layer in installed.layers:
        if isinstance(layer, DistriGroupNorm):
            kinds[layer.name] = "gn"
        elif isinstance(layer, DistriConv2d):
            kinds[layer.name] = "halo"
        elif isinstance(layer, (DistriKV, DistriJointAttention)):
            kinds[layer.name] = "kv"
    return kinds


@dataclass
class ExperimentBuffers(StaleBuffers):
    """`StaleBuffers` whose displaced reads return the other ranks' parts extrapolated from the
    last two versions received: prev + f * (prev - prev2), f = `control.effective`.

    prev2 (one copy of the other ranks' parts per extrapolated exchange: the extra memory,
    `extra_bytes`) is refreshed on every call that reads or replaces the stale state: a displaced
    read (`stale`) and a synchronous gather that keeps its result (`gather_start`). Returned
    tensors have the dtype and shapes `StaleBuffers.stale` returns (the arithmetic runs in
    float32 for half-precision exchanges); this rank's part is returned as it is."""

    control: Extrapolation | None = None
    _older: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    _made: dict[str, list] = field(default_factory=dict)  # displaced probe: last step's predictions

    def kind(self, uname: str, entry: _Entry) -> str:
        known = self.control.kinds.get(uname.split("#")[0])
        if known is not None:
            return known
        s = entry.shapes[self.rank]  # fallback: GroupNorm moments are [2, B, G]
        return "gn" if len(s) == 3 and s[0] == 2 else "other"

    def _extrapolates(self, uname: str, entry: _Entry) -> bool:
        return self.control.include_gn or self.kind(uname, entry) != "gn"

    def _remember(self, uname: str, views: list[torch.Tensor]) -> None:
        older = self._older.get(uname)
        if older is None:
            older = self._older[uname] = [None if j == self.rank else torch.empty_like(v)
                                          for j, v in enumerate(views)]
        for j, v in enumerate(views):
            if j != self.rank:
                older[j].copy_(v)

    def _predict(self, uname: str, views: list[torch.Tensor], f: float) -> list[torch.Tensor]:
        older = self._older.get(uname)
        if older is None:
            return list(views)
        out = list(views)
        for j, cur in enumerate(views):
            if j == self.rank:
                continue
            if cur.dtype in (torch.float16, torch.bfloat16):
                c = cur.float()
                out[j] = (c + f * (c - older[j].float())).to(cur.dtype)
            else:
                out[j] = cur + f * (cur - older[j])
        return out

    def stale(self, name: str, fresh, scaled_dim: int | None) -> list[torch.Tensor]:
        uname = self._next(name)
        views = super().stale(name, fresh, scaled_dim)
        entry = self.entries[uname]
        if not self._extrapolates(uname, entry):
            return views
        out = self._predict(uname, views, self.control.effective)
        dprobe = self.control.displaced_probe
        if dprobe is not None:
            # What arrives now (the other ranks' tensors of the step before) against what was
            # predicted for it one step earlier, at every probe scale.
            made = self._made.pop(uname, None)
            if made is not None:
                self._score(dprobe, self.control.step - 1, uname, entry, views, made)
            if uname in self._older:
                f = self.control.factor
                self._made[uname] = [(s, [p.clone() for p in self._predict(uname, views, s * f)])
                                     for s in self.control.probe_scales]
        self._remember(uname, views)
        return out

    def gather_start(self, name: str, fresh: torch.Tensor, scaled_dim: int | None, keep: bool = True):
        uname = self._next(name)
        finish = super().gather_start(name, fresh, scaled_dim, keep)
        entry = self.entries.get(uname) if keep and self.keep_stale else None
        if entry is None or entry.bucket is None or not self._extrapolates(uname, entry):
            return finish  # the register call, or an exchange never read stale / not extrapolated

        def record() -> list[torch.Tensor]:
            self._wait(entry.bucket)
            prev = list(entry.views)  # last call's, about to be replaced
            probe = self.control.probe
            preds = None
            if probe is not None and self._older.get(uname) is not None:
                f = self.control.factor
                preds = [(s, [p.clone() for p in self._predict(uname, prev, s * f)])
                         for s in self.control.probe_scales]
            self._remember(uname, prev)
            views = finish()
            if preds is not None:
                self._score(probe, self.control.step, uname, entry, views, preds)
            return views

        return record

    def _score(self, probe: dict, step_index: int, uname: str, entry: _Entry, views: list[torch.Tensor],
               preds) -> None:
        """Probe: sum of |prediction - actual| and of |actual| over the other ranks' parts, per
        step, kind and scale."""
        step = probe.setdefault(step_index, {})
        acc = step.setdefault(self.kind(uname, entry), {"abs": 0.0, **{f"err_{s:g}": 0.0 for s, _ in preds}})
        for j, v in enumerate(views):
            if j == self.rank:
                continue
            v32 = v.float()
            acc["abs"] += float(v32.abs().sum())
            for s, pred in preds:
                acc[f"err_{s:g}"] += float((pred[j].float() - v32).abs().sum())

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self._older.values() for t in parts if t is not None)

    def close(self) -> None:
        super().close()
        self._older.clear()
        self._made.clear()


# -- the loops ---------------------------------------------------------------------------------
def extrapolate_task(info, model_name: str, size: int, steps: int, runs: Sequence[tuple], guidance: float = 1.0,
                     seed: int = 0, dtype: str = "fp32", mode: str = "corrected_async_gn",
                     probe_displaced: bool = False, sampler_kind: str = "ddim"):
    """On every rank: the plain model's loop (the one-device reference), then one engine loop per
    run (variant, warmup[, scale override]) in the same process, the engine reset between them;
    variant "probe" runs every step synchronously with the prediction probe; `probe_displaced`
    probes the extrapolating variants' own displaced loops too. Rank 0 returns the reference,
    every run's final latent, seconds, stale and extra bytes, and the probe sums."""
    e = experiment_setup(info, model_name, size, steps, guidance, dtype, seed, mode, sampler_kind)
    x, ctx, extra, batch, loop, ref, ref_s, engine, device = (e[k] for k in (
        "x", "ctx", "extra", "batch", "loop", "ref", "ref_s", "engine", "device"))
    sigmas, timesteps = loop_schedule(model_name, steps, sampler_kind)
    factors, t_factors = extrapolation_factors(sigmas), extrapolation_factors(timesteps)
    kinds = layer_kinds(engine.installed)
    base_config = engine.config
    out_runs = []
    try:
        for run in runs:
            variant, warmup, *override = run
            probe = variant == "probe"
            scale, include_gn = (1.0, True) if probe else VARIANTS[variant]
            if override:
                scale = override[0]
            control = None
            engine.reset()
            engine.config = replace(base_config, mode=variant if variant in MODE_VARIANTS else base_config.mode)
            if variant in MODE_VARIANTS and engine.adapter.flow:
                continue  # refused by the engine on flow models (see the module's docstring)
            if scale is None:
                engine.buffers = StaleBuffers
            else:
                control = Extrapolation(scale=scale, include_gn=include_gn, kinds=kinds,
                                        probe={} if probe else None,
                                        displaced_probe={} if probe_displaced and not probe else None)
                engine.buffers = functools.partial(ExperimentBuffers, control=control)
            chosen = frozenset(range(steps)) if probe else frozenset(fixed_sync_steps(steps, warmup))
            step = [0]

            def unet_call(xx, tt, chosen=chosen, step=step):
                return engine(xx, tt, ctx, sync=step[0] in chosen, **extra)

            guided = _guided(unet_call, batch, guidance, device)

            fs = t_factors if variant in TIMESTEP_VARIANTS else factors

            def eps_fn(xt, t, i, guided=guided, step=step, control=control, fs=fs):
                step[0] = i
                if control is not None:
                    control.factor, control.step = fs[i], i
                return guided(xt, t, i)

            t0 = time.perf_counter()
            with torch.inference_mode():
                out = loop(eps_fn, x, steps)
            seconds = time.perf_counter() - t0
            states = list(engine._keys.values())
            extra_bytes = sum(getattr(s.buffers, "extra_bytes", 0) for s in states)
            in_stale = variant in MODE_VARIANTS  # the engine's own buffers count their extra bytes as stale
            out_runs.append({
                "variant": variant, "warmup": warmup, "scale": scale, "seconds": seconds,
                "latent": out.float().cpu(),
                "stale_bytes": engine.stale_bytes - (extra_bytes if in_stale else 0),
                "extra_bytes": extra_bytes,
                "probe": control.probe if probe else None,
                "displaced_probe": control.displaced_probe if control is not None else None,
            })
    finally:
        engine.buffers = StaleBuffers
        engine.config = base_config
        engine.close()
    if info.rank != 0:
        return None
    return {"reference": ref.float().cpu(), "runs": out_runs, "reference_s": ref_s, "factors": factors,
            "timestep_factors": t_factors}


def run_loops(model_name: str, size: int, steps: int, runs: Sequence[tuple], *, ranks: int = 2,
              guidance: float = 1.0, seed: int = 0, threads: int = 1, timeout: float = 3600.0,
              probe_displaced: bool = False, cluster: LocalCluster | None = None, sampler_kind: str = "ddim") -> dict:
    """`extrapolate_task` on `ranks` local CPU ranks; adds every run's errors against one device."""
    if cluster is None:
        with LocalCluster(ranks, threads=threads) as own:
            return run_loops(model_name, size, steps, runs, ranks=ranks, guidance=guidance, seed=seed,
                             threads=threads, timeout=timeout, probe_displaced=probe_displaced, cluster=own,
                             sampler_kind=sampler_kind)
    r0 = cluster.run(extrapolate_task, model_name, size, steps, [tuple(r) for r in runs], guidance, seed,
                     probe_displaced=probe_displaced, sampler_kind=sampler_kind, timeout=timeout)[0]
    for r in r0["runs"]:
        r["errors"] = _errors(r["latent"], r0["reference"])
    return r0


def probe_table(probe: dict, steps: int, warmup: int) -> dict:
    """Per kind: mean relative error (sum |pred - fresh| / sum |fresh|) of the stale version and
    of the extrapolations, over the steps a displaced loop with `warmup` would run displaced,
    and over steps 2.. (all the steps with two earlier versions)."""
    out = {}
    for label, first in (("displaced_steps", warmup + 1), ("steps_2_on", 2)):
        kinds: dict[str, dict] = {}
        for i in range(max(first, 2), steps):
            for kind, acc in probe.get(i, {}).items():
                k = kinds.setdefault(kind, {})
                for key, v in acc.items():
                    k[key] = k.get(key, 0.0) + v
        out[label] = {kind: {("stale" if key == "err_0" else f"extrap_x{key[4:]}"): (v / acc["abs"] if acc["abs"] else None)
                             for key, v in acc.items() if key != "abs"}
                      for kind, acc in kinds.items()}
    return out


def run_experiment(loops: Sequence[tuple], *, variants: Sequence[str] = tuple(VARIANTS), warmup: int = 4,
                   ranks: int = 2, seed: int = 0, threads: int = 1, probe: bool = True,
                   timeout: float = 3600.0) -> dict:
    results = []
    runs = [(v, warmup) for v in variants] + ([("probe", warmup)] if probe else [])
    with LocalCluster(ranks, threads=threads) as cluster:
        for model_name, size, steps, *rest in loops:
            kind = rest[0] if rest else "ddim"
            t0 = time.perf_counter()
            run = run_loops(model_name, size, steps, runs, ranks=ranks, seed=seed, timeout=timeout,
                            probe_displaced=probe, cluster=cluster, sampler_kind=kind)
            wall = time.perf_counter() - t0
            ref_scale = float(run["reference"].abs().mean())
            rows, probe_out = [], None
            for r in run["runs"]:
                if r["variant"] == "probe":
                    probe_out = probe_table(r["probe"], steps, warmup)
                    continue
                err = r["errors"]
                rows.append({"variant": r["variant"], "scale": r["scale"], "mean_abs_err": err["mean_abs_err"],
                             "max_abs_err": err["max_abs_err"], "psnr_db": err["psnr_db"],
                             "rel_mean_abs_err": err["mean_abs_err"] / ref_scale if ref_scale else None,
                             "stale_bytes": r["stale_bytes"], "extra_bytes": r["extra_bytes"],
                             "loop_s": round(r["seconds"], 2),
                             "displaced_probe": (probe_table(r["displaced_probe"], steps, warmup)["displaced_steps"]
                                                 if r["displaced_probe"] is not None else None)})
            base = rows[0]["mean_abs_err"] if rows and rows[0]["variant"] == "corrected_async_gn" else None
            for r in rows:
                r["vs_plain"] = r["mean_abs_err"] / base if base else None
            entry = {"model": model_name, "size": size, "latent": size // 8, "steps": steps,
                     "sampler": "flow_euler" if model_name in TRANSFORMERS else kind, "warmup": warmup,
                     "factors": [round(f, 4) for f in run["factors"]],
                     "timestep_factors": [round(f, 4) for f in run["timestep_factors"]],
                     "reference_mean_abs": ref_scale, "reference_s": round(run["reference_s"], 2),
                     "wall_s": round(wall, 1), "results": rows, "probe": probe_out}
            log.info("%s %d px, %d steps %s: %.1f s", model_name, size, steps, entry["sampler"], wall)
            for r in rows:
                log.info("  %-20s mean %.4g (%.3fx) max %.4g extra %d B %s", r["variant"], r["mean_abs_err"],
                         r["vs_plain"] or float("nan"), r["max_abs_err"], r["extra_bytes"], r["displaced_probe"] or "")
            if probe_out:
                log.info("  probe %s", probe_out["displaced_steps"])
            results.append(entry)
    return {"benchmark": "distri_core.extrapolate_bench", "mode": "corrected_async_gn", "ranks": ranks,
            "warmup": warmup, "seed": seed, "guidance": 1.0,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "python": sys.version.split()[0], "backend": "gloo", "threads_per_rank": threads},
            "loops": results}


def _parse_loops(text: str) -> list[tuple]:
    """model:size_px:steps[:sampler] items, comma-separated (sampler: a UNet's, DDIM by default)."""
    loops = []
    for item in text.split(","):
        model, size, steps, *kind = item.split(":")
        kind = kind[0] if kind else "ddim"
        if kind not in UNET_SAMPLERS:
            raise ValueError(f"loop {item!r}: sampler {kind!r} is not known; use one of {', '.join(UNET_SAMPLERS)}")
        loops.append((model, int(size), int(steps), kind))
    return loops


DEFAULT_LOOPS = ("tiny:512:20,tiny:512:50,tiny:512:20:euler,tiny:512:50:euler,tiny:512:20:euler_karras,"
                 "flux-tiny:512:20,flux-tiny:512:50,sd15:128:20,sd15:128:20:euler")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distri_core.extrapolate_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--loops", default=DEFAULT_LOOPS,
                   help="comma list of model:size_px:steps[:sampler] (UNets: ddim (default), euler or "
                        "euler_karras; flux-* always run flow-matching Euler)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--no-probe", action="store_true", help="skip the all-synchronous prediction probe loop")
    experiment_args(p)
    args = p.parse_args(argv)
    return run_experiment_main(args, lambda: run_experiment(
        _parse_loops(args.loops), variants=args.variants.split(","), warmup=args.warmup, ranks=args.ranks,
        seed=args.seed, threads=args.threads, probe=not args.no_probe, timeout=args.timeout))


if __name__ == "__main__":
    sys.exit(main())
