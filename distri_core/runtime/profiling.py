"""Measuring a pool's machine profile for the planner (distri_core.planner), and caching it.

A profile is measured once per pool, model and dtype, in a few seconds, from the run's own
inputs: every rank runs the whole model alone at three heights (a quarter, half and all of the
image, one image; all of it with two images too) at the same time (its compute curve), the ranks
all-gather a small and a large tensor (latency, bandwidth), and real calls at the run's own batch
and size (one device alone, every rank synchronous, every rank displaced) calibrate the
distributed layers' own cost and the bytes they send per token. It is cached on disk keyed by
devices, model and dtype (`ProfileCache`), and measured again when the cache is cleared; a run
of a batch and size the profile was not calibrated at adds a calibration (`calibrate_run`, a few
calls) to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import torch

from ..config import Mode, PatchParallelConfig
from ..planner import (
    CALIBRATED,
    MAX_CALIBRATIONS,
    DeviceSpeed,
    MachineProfile,
    RunShape,
    call_layout,
    call_seconds,
    compute_seconds,
    profile_key,
    rank_order,
    shape_of,
)
from ..surgery.adapters import chunk_batch
from .errors import WorkerError

log = logging.getLogger("distri_core.profiling")


FIT_TOLERANCE = 0.05


def fit_speed(samples: list[tuple[float, ...]]) -> DeviceSpeed:
    """seconds = fixed + batch * (per_token * n + per_pair * n^2) through (tokens n, seconds) or
    (tokens n, batch, seconds) samples, every coefficient 0 or more. Samples at two batch sizes
    tell a per-call cost from a per-token one. The fewest terms that fit the samples within
    FIT_TOLERANCE (relative RMS) win: three samples always fit three terms exactly, and a
    quadratic term fitted to timing noise would explode when the planner extrapolates."""
    samples = [(s[0], 1.0, s[1]) if len(s) == 2 else s for s in samples]
    n = torch.tensor([s[0] for s in samples], dtype=torch.float64)
    b = torch.tensor([s[1] for s in samples], dtype=torch.float64)
    y = torch.tensor([s[2] for s in samples], dtype=torch.float64)
    columns = {"fixed": torch.ones_like(n), "per_token": b * n, "per_pair": b * n * n}
    fits: list[tuple[int, float, DeviceSpeed]] = []
    for size in (1, 2, 3):
        for terms in combinations(columns, size):
            a = torch.stack([columns[t] for t in terms], 1)
            scale = a.abs().max(0).values
            coef = torch.linalg.lstsq(a / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
            if (coef < 0).any() or "per_token" not in terms and "per_pair" not in terms:
                continue  # negative, or flat in the image size (never true of a model)
            rms = float(((a @ coef - y) ** 2).mean().sqrt() / y.mean().clamp_min(1e-12))
            values = dict.fromkeys(columns, 0.0) | {t: float(c) for t, c in zip(terms, coef, strict=True)}
            fits.append((size, rms, DeviceSpeed(**values)))
    good = [f for f in fits if f[1] <= FIT_TOLERANCE]
    if good:
        return min(good, key=lambda f: (f[0], f[1]))[2]
    return min(fits, key=lambda f: f[1])[2] if fits else DeviceSpeed(0.0, float(y.max() / n.max()), 0.0)


def profile_heights(height: int, unit: int, world: int) -> list[int]:
    """Three heights (multiples of `unit`) to time the whole model at: about 1/4, 1/2 and all of
    the image, so that every candidate the planner weighs for this image (a band, or the whole
    image on one device) lies inside the measured range instead of beyond it."""
    blocks = max(height // unit, 1)
    picks = sorted({max(1, blocks // 4), max(1, blocks // 2), blocks})
    return [b * unit for b in picks]


def out_of_memory(error: WorkerError) -> bool:
    """A worker ran out of device memory (CUDA's OutOfMemoryError, or the CPU allocator's)."""
    text = f"{error.kind} {error.message}".lower()
    return "outofmemory" in text or "out of memory" in text or "can't allocate memory" in text


def double_batch(value):
    """One-image inputs repeated to two images (tensors with a batch of 1)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.dim() and value.shape[0] == 1 else value
    if isinstance(value, dict):
        return {k: double_batch(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(double_batch(v) for v in value)
    return value


def measure(pool, x: torch.Tensor, timesteps, context, extra: dict, unit: int, model: str, dtype: str,
            base: PatchParallelConfig) -> MachineProfile:
    """The profile of `pool` with its loaded model, from one call's inputs (`x` [B, C, H, W]; the
    other inputs as the pool takes them, without ControlNet residuals). `base` gives the comm
    dtype and host device. Leaves the pool configured with `base`'s ranks in full_sync."""
    t_start = time.perf_counter()
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    x1, t1, c1, e1 = chunk_batch((x, timesteps, context, extra), 0, 1, batch)
    world = pool.world
    pool.configure(_every_rank_exact(pool, base))

    samples: list[list[tuple[float, float, float]]] = [[] for _ in range(world)]
    heights = profile_heights(height, unit, world)
    x2, t2, c2, e2 = double_batch((x1, t1, c1, e1))
    oom_load = 0.0
    for h, two in [(h, False) for h in heights] + [(heights[-1], True)]:
        args = (x2[:, :, :h].contiguous(), t2, c2) if two else (x1[:, :, :h].contiguous(), t1, c1)
        kw = e2 if two else e1
        try:
            pool.solo(*args, **kw)  # the first call at a size pays one-time costs
            seconds = [min(a, b) for a, b in zip(pool.solo(*args, **kw), pool.solo(*args, **kw), strict=True)]
        except WorkerError as e:
            if not out_of_memory(e) or not samples[0]:
                raise
            # A whole image (or two) does not fit on one device: exactly the runs that need several.
            # Profile with what fitted; the planner will not put this much on one device.
            oom_load = float((2 if two else 1) * h * width)
            log.info("profiling: %d x %d rows ran out of device memory; larger loads are not planned on one "
                     "device", 2 if two else 1, h)
            pool.release()
            break
        for r, s in enumerate(seconds):
            samples[r].append((float(h * width), 2.0 if two else 1.0, s))
    speeds = tuple(fit_speed(s) for s in samples)

    if world > 1:
        small, big = 1 << 10, 1 << 22
        probe = pool.probe_comm((small, big))
        latency = probe["seconds"][0]
        spread = max(probe["seconds"][1] - latency, 1e-9)
        bytes_per_s = (world - 1) * (big - small) / spread
    else:
        probe, latency, bytes_per_s = {}, 0.0, 1e12

    profile = MachineProfile(tuple(pool.devices), model, dtype, speeds, latency, bytes_per_s, 0.0, 0.0, 0.0, 0.0,
                             0.0, 0.0, oom_load=oom_load)
    measured = {"heights": heights, "width": width, "unit": unit, "oom_load": oom_load,
                "solo_s": [[round(s[-1], 5) for s in r] for r in samples], "probe": probe}
    profile = replace(profile, measured=measured)
    profile = calibrate_run(pool, profile, x, timesteps, context, extra, unit, base)
    measured = dict(profile.measured, seconds=round(time.perf_counter() - t_start, 2),
                    when=time.strftime("%Y-%m-%d %H:%M:%S"))
    log.info("machine profile of %s on %s measured in %.1f s", model, ", ".join(pool.devices), measured["seconds"])
    return replace(profile, measured=measured)


def calibrate_run(pool, profile: MachineProfile, x: torch.Tensor, timesteps, context, extra: dict, unit: int,
                  base: PatchParallelConfig) -> MachineProfile:
    """`profile` with a calibration measured at this run's own batch and latent size (`x` is the
    run's first call): real calls of each kind (one device alone, every rank synchronous, every
    rank displaced), the faster of two kept. Where a call runs out of device memory, the profile
    keeps the calibrations it had. Leaves the pool configured with every rank in full_sync."""
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    ranks = tuple(range(pool.world))
    exact = _every_rank_exact(pool, base)
    run = RunShape((1.0, 0.0), batch, height, width, unit)
    t0 = time.perf_counter()
    try:
        fitted, calls = _calibrate_calls(pool, profile, exact, base, (x, timesteps, context, extra), run, ranks)
    except WorkerError as e:
        if not out_of_memory(e):
            raise
        log.info("profiling: a calibration call at %d x %d x %d ran out of device memory; predictions use the "
                 "calibrations measured before", batch, height, width)
        pool.release()
        pool.configure(exact)
        return _with_calibration(profile, {"batch": batch, "height": height, "width": width,
                                           "out_of_memory": True})  # not tried again
    return _with_calibration(fitted, {
        "batch": batch, "height": height, "width": width, **{k: getattr(fitted, k) for k in CALIBRATED},
        "seconds": round(time.perf_counter() - t0, 2),
        "calls": {k: {f: v.get(f) for f in ("seconds", "worker_seconds", "overhead_s", "bytes_sent", "collectives")}
                  for k, v in calls.items()}})


def _every_rank_exact(pool, base: PatchParallelConfig) -> PatchParallelConfig:
    """`base` on every rank of `pool`, exact: what profiling runs on and leaves the pool in."""
    return replace(base, world_size=pool.world, ranks=(), mode=Mode.FULL_SYNC, cfg_split=False, warmup_steps=0,
                   comm_dtype="auto", devices=tuple(pool.devices) if base.devices else ())


def _with_calibration(profile: MachineProfile, entry: dict) -> MachineProfile:
    """`profile` with `entry` in place of any calibration of its shape, the oldest dropped beyond
    MAX_CALIBRATIONS."""
    kept = tuple(c for c in profile.calibrations if shape_of(c) != shape_of(entry))
    return replace(profile, calibrations=(kept + (entry,))[-MAX_CALIBRATIONS:])


def _calibrate_calls(pool, profile: MachineProfile, exact: PatchParallelConfig, base: PatchParallelConfig, inputs,
                     run: RunShape, ranks: tuple[int, ...]) -> tuple[MachineProfile, dict]:
    """Two real calls of each kind on the run's own inputs, the faster one kept: the pool's own
    cost, the bytes the layers send per token, and `calibrate`'s corrections."""
    xs, t, c, e = inputs
    calls: dict[str, dict] = {}

    def timed(key, sync=None) -> dict:
        pool(xs, t, c, key=key, sync=True, **e)  # a first call pays one-time costs (and fills the stale buffers)
        out = []
        for _ in range(2):
            pool(xs, t, c, key=key, sync=sync, **e)
            out.append(dict(pool.last_call))
        pool.end_run()
        return min(out, key=lambda call: call["seconds"])

    one = rank_order(len(ranks), base.light_ranks)[0]
    if not profile.oom_load or run.batch * run.tokens < profile.oom_load:  # else the planner never runs it alone
        pool.configure(replace(exact, world_size=1, ranks=(one,),
                               devices=(exact.devices[one],) if exact.devices else ()))
        calls["one"] = timed(("profile", "one"))
    if len(ranks) > 1:
        for kind, mode, sync in (("sync", Mode.FULL_SYNC, True), ("async", Mode.CORRECTED_ASYNC_GN, False)):
            pool.configure(replace(exact, mode=mode,
                                   comm_dtype=base.comm_dtype if mode is not Mode.FULL_SYNC else "auto"))
            calls[kind] = timed(("profile", kind), sync)
    pool.configure(exact)
    host = min(call["overhead_s"] for call in calls.values())
    profile = replace(profile, host_s=host)
    if len(ranks) > 1:
        band = max(call_layout(run, ranks, False, base.light_ranks).bands.heights) * run.width * run.batch
        s, a = calls["sync"], calls["async"]
        profile = replace(profile, sync_bytes_per_token=s["bytes_sent"] / band,
                          async_bytes_per_token=a["bytes_sent"] / band, sync_collectives=float(s["collectives"]))
    seconds = {kind: call["seconds"] for kind, call in calls.items()}
    return calibrate(profile, run, ranks, base.light_ranks, seconds.get("sync"), seconds.get("async"),
                     seconds.get("one"), one), calls


def calibrate(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...], light: tuple[int, ...],
              sync_s: float | None, async_s: float | None, one_s: float | None = None,
              one: int = 0) -> MachineProfile:
    """Fit the profile's prediction of a call to what one synchronous and one displaced call of
    `run` on `ranks`, and one call on rank `one` alone, measured: time beyond the prediction is
    the layers' (or the lone device's) own per-call work, an overhead; time short of it means the
    work costs less than the solo curve says (measured with every rank busy at once), a scale."""
    bare = replace(profile, sync_overhead_s=0.0, async_overhead_s=0.0, sync_scale=1.0, async_scale=1.0,
                   one_overhead_s=0.0, one_scale=1.0)
    fitted = {}
    kinds = [("one", one_s, (one,), True)]
    if len(ranks) > 1:
        kinds += [("sync", sync_s, ranks, True), ("async", async_s, ranks, False)]
    for kind, measured, on, sync in kinds:
        if measured is None:
            continue
        predicted = call_seconds(bare, run, on, False, sync, light, shares=())  # the calls ran even bands
        if measured >= predicted or kind == "sync":
            # A synchronous call's blocking exchanges make the difference hard to attribute: only
            # an extra cost is taken from it, never a scale.
            fitted[f"{kind}_overhead_s"], fitted[f"{kind}_scale"] = max(0.0, measured - predicted), 1.0
            continue
        compute = compute_seconds(profile, run, on, False, light, shares=())
        left = measured - bare.host_s
        fitted[f"{kind}_overhead_s"] = 0.0
        fitted[f"{kind}_scale"] = min(1.0, max(0.25, left / compute)) if compute > 0 else 1.0
    return replace(profile, **fitted)


def default_cache_dir() -> Path:
    if os.environ.get("DISTRI_CACHE_DIR"):
        return Path(os.environ["DISTRI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distri_patch_parallel" / "profiles"


class ProfileCache:
    """Machine profiles on disk, one JSON file per (devices, model, dtype)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = Path(directory) if directory is not None else None

    @property
    def directory(self) -> Path:
        """The given directory, else $DISTRI_CACHE_DIR or ~/.cache/distri_patch_parallel/profiles
        (read at every use, so a changed environment takes effect)."""
        return self._directory or default_cache_dir()

    def path(self, devices, model: str, dtype: str) -> Path:
        return self.directory / f"{profile_key(tuple(devices), model, dtype)}.json"

    def get(self, devices, model: str, dtype: str) -> MachineProfile | None:
        path = self.path(devices, model, dtype)
        try:
            return MachineProfile.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as e:  # a profile from another version: measure again
            log.warning("ignoring the unreadable machine profile %s (%s)", path, e)
            return None

    def put(self, profile: MachineProfile) -> Path:
        path = self.path(profile.devices, profile.model, profile.dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.to_json(), indent=1))
        os.replace(tmp, path)
        return path

    def clear(self) -> int:
        """Forget every profile (they are measured again at the next run); how many were removed."""
        removed = 0
        for p in self.directory.glob("*.json") if self.directory.is_dir() else ():
            p.unlink(missing_ok=True)
            removed += 1
        return removed
