"""Measuring a pool's machine profile for the planner (distri_core.planner), and caching it.

A profile is measured once per pool, model and dtype, in a few seconds, from the run's own
inputs cut to one image: every rank runs the whole model alone at three heights (a quarter, half
and all of the image, one image; all of it with two images too) at the same time (its compute
curve), the ranks all-gather a small and a large tensor (latency, bandwidth), and
two real calls per kind (synchronous, displaced) on every rank calibrate the distributed layers'
own cost and the bytes they send per token. It is cached on disk keyed by devices, model and
dtype (`ProfileCache`), and measured again when the cache is cleared.
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
    DeviceSpeed,
    MachineProfile,
    RunShape,
    call_layout,
    call_seconds,
    comm_seconds,
    compute_seconds,
    profile_key,
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
    ranks = tuple(range(world))
    exact = replace(base, world_size=world, ranks=(), mode=Mode.FULL_SYNC, cfg_split=False, warmup_steps=0,
                    comm_dtype="auto", devices=tuple(pool.devices) if base.devices else ())
    pool.configure(exact)

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

    # Calibration: real calls of each kind on every rank (the faster of two), one image, at half
    # the image (the band size of two ranks), where the per-call cost shows more than at full size.
    h = heights[-2] if len(heights) > 1 and heights[-2] // unit >= world else heights[-1]
    xs = x1[:, :, :h].contiguous()
    run = RunShape((1.0, 0.0), 1, h, width, unit)
    band = max(call_layout(run, ranks, False, base.light_ranks).bands.heights) * width
    profile = MachineProfile(tuple(pool.devices), model, dtype, speeds, latency, bytes_per_s, 0.0, 0.0, 0.0, 0.0,
                             0.0, 0.0, oom_load=oom_load)
    calls: dict[str, dict] = {}
    try:
        profile, calls = _calibrate_calls(pool, profile, exact, base, xs, t1, c1, e1, run, band, ranks)
    except WorkerError as e:
        if not out_of_memory(e):
            raise
        log.info("profiling: a calibration call ran out of device memory; predictions use the solo curve only")
        pool.release()
        pool.configure(exact)
        calls = {}
    measured = {"heights": heights, "width": width, "calibration_height": h, "unit": unit, "oom_load": oom_load,
                "solo_s": [[round(s[-1], 5) for s in r] for r in samples],
                "probe": probe, "calls": {k: {f: v.get(f) for f in ("seconds", "worker_seconds", "overhead_s",
                                                                    "bytes_sent", "collectives")}
                                          for k, v in calls.items()},
                "seconds": round(time.perf_counter() - t_start, 2), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    log.info("machine profile of %s on %s measured in %.1f s", model, ", ".join(pool.devices), measured["seconds"])
    return replace(profile, measured=measured)


def _calibrate_calls(pool, profile: MachineProfile, exact: PatchParallelConfig, base: PatchParallelConfig, xs, t1,
                     c1, e1, run: RunShape, band: int, ranks: tuple[int, ...]) -> tuple[MachineProfile, dict]:
    """Two real calls of each kind (synchronous, displaced) on every rank, the faster one kept:
    the pool's own cost, the bytes the layers send per token, and `calibrate`'s corrections."""
    calls: dict[str, dict] = {}
    if len(ranks) == 1:
        pool(xs, t1, c1, key=("profile", "one"), **e1)
        pool(xs, t1, c1, key=("profile", "one"), **e1)
        calls["one"] = dict(pool.last_call)
        pool.end_run()
        return replace(profile, host_s=calls["one"]["overhead_s"]), calls
    for kind, mode, sync in (("sync", Mode.FULL_SYNC, True), ("async", Mode.CORRECTED_ASYNC_GN, False)):
        pool.configure(replace(exact, mode=mode, comm_dtype=base.comm_dtype if mode is not Mode.FULL_SYNC else "auto"))
        pool(xs, t1, c1, key=("profile", kind), sync=True, **e1)
        timed = []
        for _ in range(2):
            pool(xs, t1, c1, key=("profile", kind), sync=sync, **e1)
            timed.append(dict(pool.last_call))
        calls[kind] = min(timed, key=lambda c: c["seconds"])
        pool.end_run()
    pool.configure(exact)
    host = min(c["overhead_s"] for c in calls.values())
    s, a = calls["sync"], calls["async"]
    profile = replace(profile, host_s=host, sync_bytes_per_token=s["bytes_sent"] / band,
                      async_bytes_per_token=a["bytes_sent"] / band, sync_collectives=float(s["collectives"]))
    return calibrate(profile, run, ranks, base.light_ranks, s["seconds"], a["seconds"]), calls


def calibrate(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...], light: tuple[int, ...],
              sync_s: float, async_s: float) -> MachineProfile:
    """Fit the profile's prediction of a split call to what one synchronous and one displaced call
    of `run` on `ranks` measured: time beyond the prediction is the layers' own per-call work (an
    overhead); time short of it means a band costs less than the solo curve says (a scale)."""
    bare = replace(profile, sync_overhead_s=0.0, async_overhead_s=0.0, sync_scale=1.0, async_scale=1.0)
    group = len(ranks)
    bands = call_layout(run, ranks, False, light).bands.heights
    compute = compute_seconds(profile, run, ranks, False, light)
    fixed = {}
    for kind, measured, sync in (("sync", sync_s, True), ("async", async_s, False)):
        predicted = call_seconds(bare, run, ranks, False, sync, light)
        if measured >= predicted or sync:
            # A synchronous call's blocking exchanges make the difference hard to attribute: only
            # an extra cost is taken from it, never a scale.
            fixed[kind] = (max(0.0, measured - predicted), 1.0)
            continue
        comm = comm_seconds(bare, run, max(bands), group, run.batch, sync)
        left = measured - bare.host_s - (comm if sync else 0.0)
        fixed[kind] = (0.0, min(1.0, max(0.25, left / compute)) if compute > 0 else 1.0)
    return replace(profile, sync_overhead_s=fixed["sync"][0], sync_scale=fixed["sync"][1],
                   async_overhead_s=fixed["async"][0], async_scale=fixed["async"][1])


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
