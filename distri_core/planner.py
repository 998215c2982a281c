"""mode = auto: the layout of every sampling run, chosen from a measured machine profile.

Per run the planner picks how many of the pool's devices to use, CFG split or not, exact
(`full_sync`) or displaced (`corrected_async_gn`), and which steps run synchronously. It predicts
each candidate's seconds per step from a `MachineProfile` (measured once per pool, model and
dtype by `distri_core.runtime.profiling`) and takes the fastest candidate the fidelity rule
allows:

- schedules of `EXACT_AT_MOST` (10) steps or fewer never read stale activations (DistriFusion's
  authors: stale activations fail below about 10 steps; distilled models live there); they run
  exact, CFG-split, or on one device;
- in displaced runs, the first step, `warmup` more, and every step whose drift
  (`distri_core.schedule`) exceeds `DRIFT_SYNC` run synchronously; flow models (Flux) instead
  run the first step and every step whose drift exceeds `FLOW_DRIFT_SYNC` synchronously
  (`displaced_sync_steps` says why);
- one device is always a candidate, so the chosen plan is never predicted slower than it;
  exact wins over displaced unless displaced is predicted more than `EXACT_PREFERENCE` faster.

Pure arithmetic: no torch.distributed, no processes. Layouts come from `layout.make_layout`, the
function the engine cuts every call with.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from .config import CommDtype, Mode, PatchParallelConfig
from .layout import CallLayout, make_layout
from .schedule import fixed_sync_steps, step_drift

EXACT_AT_MOST = 10
DRIFT_SYNC = 0.3
FLOW_DRIFT_SYNC = 0.12
EXACT_PREFERENCE = 0.03
SHARE_SPREAD = 1.25  # ranks this much apart in speed get bands sized by speed, closer ones even bands
DISPLACED = Mode.CORRECTED_ASYNC_GN


@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds one rank needs for a whole call alone, batch 1: fixed + per_token * n + per_pair * n * N,
    with n the latent tokens (rows x width) it computes and N the tokens attention looks at (the
    whole image): the convolutions scale with n, attention with n * N."""

    fixed: float
    per_token: float
    per_pair: float

    def seconds(self, tokens: float, all_tokens: float, batch: int) -> float:
        return self.fixed + batch * (self.per_token * tokens + self.per_pair * tokens * all_tokens)


@dataclass(frozen=True)
class MachineProfile:
    """What a pool's devices measured for one model and dtype (see runtime.profiling)."""

    devices: tuple[str, ...]
    model: str
    dtype: str
    speeds: tuple[DeviceSpeed, ...]  # per pool rank
    latency_s: float  # one all-gather of a small tensor
    bytes_per_s: float  # all-gather bandwidth: bytes received per second per rank
    host_s: float  # the pool's own cost per call (inputs and output through shared memory, messages)
    sync_overhead_s: float  # per call: the distributed layers' own work beyond compute and transfer
    async_overhead_s: float
    sync_bytes_per_token: float  # bytes each rank sends per latent token of its band, batch 1
    async_bytes_per_token: float
    sync_collectives: float  # blocking collectives per synchronous call
    measured: dict = field(default_factory=dict, compare=False)  # the raw samples, for the record
    # Band compute of a split call relative to the solo curve, from the calibration calls (below 1
    # where a band costs less than the solo timing of as many rows, e.g. memory-bound weight reads
    # on CPU ranks; the layers' extra work shows in the overheads instead).
    sync_scale: float = 1.0
    async_scale: float = 1.0
    # The smallest load (images x latent tokens on one rank) that ran out of device memory while
    # profiling; 0 = none did. Layouts that put as much on one rank are not chosen.
    oom_load: float = 0.0
    # A whole call on one device alone, relative to the solo curve (measured with every rank busy).
    one_overhead_s: float = 0.0
    one_scale: float = 1.0
    # Every calibration measured (one per run shape: batch, height, width), with the fields above
    # it sets; `for_run` picks the one nearest a run's load.
    calibrations: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> MachineProfile:
        data = dict(data)
        data["devices"] = tuple(data["devices"])
        data["speeds"] = tuple(DeviceSpeed(**s) for s in data["speeds"])
        data["calibrations"] = tuple(data.get("calibrations", ()))
        return MachineProfile(**data)

    def calibrated_at(self, run: RunShape) -> bool:
        """Whether a calibration was measured at `run`'s own batch and latent size."""
        return any(shape_of(c) == (run.batch, run.height, run.width) for c in self.calibrations)

    def for_run(self, run: RunShape) -> MachineProfile:
        """This profile with the calibration measured nearest `run`'s load (images x latent tokens;
        the same shape when there is one). A band's cost relative to the solo curve, and the layers'
        own cost, change with the load: calibrated on one image at half the height, the prediction of
        a displaced two-image call at full height was 34-40% too fast (docs/bench/plan.md)."""
        measured = [c for c in self.calibrations if "host_s" in c]
        if not measured:
            return self
        load = run.batch * run.tokens

        def distance(c: dict) -> tuple[float, float]:
            b, h, w = shape_of(c)
            return abs(math.log(max(b * h * w, 1) / max(load, 1))), -b * h * w

        best = min(measured, key=distance)
        return replace(self, **{k: best[k] for k in CALIBRATED if k in best})


CALIBRATED = ("host_s", "sync_overhead_s", "async_overhead_s", "sync_scale", "async_scale", "one_overhead_s",
              "one_scale")
MAX_CALIBRATIONS = 16


def shape_of(calibration: dict) -> tuple[int, int, int]:
    return int(calibration["batch"]), int(calibration["height"]), int(calibration["width"])


@dataclass(frozen=True)
class RunShape:
    """What the planner knows about one sampling run."""

    sigmas: tuple[float, ...]  # steps + 1 values
    batch: int  # images per model call: 2 with CFG (cond and uncond), 1 at cfg 1 or with one cond
    height: int  # latent rows
    width: int  # latent columns
    unit: int  # band heights are multiples of this (the model's downsampling)
    flow: bool = False  # a flow-matching model (Flux)

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    @property
    def tokens(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Candidate:
    ranks: tuple[int, ...]  # pool ranks
    cfg_split: bool
    mode: str  # full_sync or the displaced mode (one rank per group: no exchange at all)
    sync_steps: tuple[int, ...]
    seconds_per_step: float
    allowed: bool
    why: str

    @property
    def label(self) -> str:
        n = len(self.ranks)
        if n == 1:
            return "one device"
        return f"{n} devices, " + ("CFG split, " if self.cfg_split else "") + self.mode


@dataclass(frozen=True)
class Plan:
    """The chosen configuration of a run, the steps it runs synchronously, and why."""

    config: PatchParallelConfig
    sync_steps: tuple[int, ...]
    seconds_per_step: float
    one_device_s: float
    reason: str
    candidates: tuple[Candidate, ...]

    @property
    def predicted_speedup(self) -> float:
        return self.one_device_s / self.seconds_per_step if self.seconds_per_step > 0 else 1.0

    def is_sync(self, step: int | None) -> bool | None:
        """Whether `step` runs synchronously (None: the step is unknown, the engine decides)."""
        if step is None:
            return None
        return step in self.sync_steps

    def summary(self) -> dict:
        """For the GUI, the API (/distri/plan) and logs."""
        c = self.config
        return {
            "devices": list(c.devices), "ranks": list(c.pool_ranks), "mode": c.mode.value, "cfg_split": c.cfg_split,
            "band_shares": list(c.band_shares),
            "sync_steps": list(self.sync_steps), "predicted_s_per_step": round(self.seconds_per_step, 4),
            "one_device_s_per_step": round(self.one_device_s, 4), "predicted_speedup": round(self.predicted_speedup, 2),
            "reason": self.reason,
            "candidates": [{"label": k.label, "ranks": list(k.ranks), "cfg_split": k.cfg_split, "mode": k.mode,
                            "predicted_s_per_step": round(k.seconds_per_step, 4), "allowed": k.allowed,
                            "why": k.why, "sync_steps": len(k.sync_steps)} for k in self.candidates],
        }

    def to_text(self) -> str:
        lines = [self.reason]
        for k in sorted(self.candidates, key=lambda k: k.seconds_per_step):
            mark = "->" if (k.ranks, k.cfg_split, k.mode) == (self.config.pool_ranks, bool(self.config.cfg_split),
                                                              self.config.mode.value) else "  "
            lines.append(f"{mark} {k.label}: {k.seconds_per_step:.3f} s/step predicted"
                         + ("" if k.allowed else f" (not allowed: {k.why})"))
        return "\n".join(lines)


def rank_order(world: int, light: tuple[int, ...]) -> tuple[int, ...]:
    """The order ranks are taken in when a plan uses fewer than all: ranks that share their GPU
    with the host application last."""
    return tuple([r for r in range(world) if r not in light] + [r for r in range(world) if r in light])


def speed_shares(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...]) -> tuple[float, ...]:
    """Rows per rank in proportion to its measured speed for this image (a slower GPU gets a
    smaller band, so the bands finish together); empty (even bands) when the ranks' speeds are
    within SHARE_SPREAD of each other (identical GPUs, timing noise), or when the machine ran out
    of memory while profiled (even bands put the least on any one device)."""
    if len(ranks) < 2 or profile.oom_load:
        return ()
    tokens = run.tokens / len(ranks)
    cost = [profile.speeds[r].seconds(tokens, run.tokens, run.batch) - profile.speeds[r].fixed for r in ranks]
    if min(cost) <= 0 or max(cost) / min(cost) < SHARE_SPREAD:
        return ()
    return tuple(round(min(cost) / c, 3) for c in cost)


def call_layout(run: RunShape, ranks: tuple[int, ...], split: bool, light: tuple[int, ...] = (),
                shares: tuple[float, ...] = ()) -> CallLayout:
    """How the engine cuts a call of `run` on pool `ranks` (`light`: pool ranks on the host's GPU;
    `shares`: relative rows per rank, empty = even)."""
    return make_layout(len(ranks), run.batch, run.height, run.unit, split,
                       tuple(i for i, r in enumerate(ranks) if r in light), shares)


def compute_seconds(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...], split: bool,
                    light: tuple[int, ...] = (), shares: tuple[float, ...] | None = None) -> float:
    """Predicted compute of one call: the slowest rank's band on its solo curve (bands sized by
    `shares`; None = as the planner sizes them, `speed_shares`)."""
    shares = speed_shares(profile, run, ranks) if shares is None else shares
    return _compute_seconds(profile, run, ranks, call_layout(run, ranks, split, light, shares))


def _compute_seconds(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...], layout: CallLayout) -> float:
    return max(profile.speeds[ranks[r]].seconds(layout.bands.heights[band] * run.width, run.tokens, c1 - c0)
               for (c0, c1), members in zip(layout.chunks, layout.groups, strict=True)
               for band, r in enumerate(members))


def call_seconds(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...], split: bool, sync: bool,
                 light: tuple[int, ...] = (), shares: tuple[float, ...] | None = None) -> float:
    """Predicted seconds of one model call of `run` on pool `ranks` (bands as `compute_seconds`)."""
    shares = speed_shares(profile, run, ranks) if shares is None else shares
    layout = call_layout(run, ranks, split, light, shares)
    compute = _compute_seconds(profile, run, ranks, layout)
    group = layout.bands.parts
    if len(ranks) == 1:
        return compute * profile.one_scale + profile.one_overhead_s + profile.host_s
    if group == 1:
        return compute + profile.host_s
    batch = layout.chunks[0][1] - layout.chunks[0][0]
    comm = comm_seconds(profile, run, max(layout.bands.heights), group, batch, sync)
    if sync:
        return compute * profile.sync_scale + profile.sync_overhead_s + comm + profile.host_s
    return max(compute * profile.async_scale + profile.async_overhead_s, comm) + profile.host_s


def comm_seconds(profile: MachineProfile, run: RunShape, band_rows: int, group: int, batch: int, sync: bool) -> float:
    """Transfer time of one call: blocking collectives in a synchronous call, the stale exchange
    (hidden behind compute when shorter) in a displaced one."""
    tokens = band_rows * run.width * batch
    if sync:
        sent = profile.sync_bytes_per_token * tokens
        return profile.sync_collectives * profile.latency_s + sent * (group - 1) / profile.bytes_per_s
    return profile.async_bytes_per_token * tokens * (group - 1) / profile.bytes_per_s


def step_seconds(profile: MachineProfile, run: RunShape, ranks: tuple[int, ...], split: bool,
                 sync_steps: tuple[int, ...], light: tuple[int, ...] = (),
                 shares: tuple[float, ...] | None = None) -> float:
    """Predicted seconds per step of a run whose `sync_steps` are synchronous and the others
    displaced (every step synchronous: an exact run), with the calibration nearest the run
    (bands as `compute_seconds`)."""
    profile = profile.for_run(run)
    sync_s = call_seconds(profile, run, ranks, split, True, light, shares)
    n_sync = len(sync_steps)
    if n_sync >= run.steps:
        return sync_s
    async_s = call_seconds(profile, run, ranks, split, False, light, shares)
    return (n_sync * sync_s + (run.steps - n_sync) * async_s) / run.steps


def displaced_sync_steps(run: RunShape, warmup: int) -> tuple[int, ...]:
    """Steps of a displaced run that still run synchronously.

    eps / v models (DDIM, Karras...): the first, `warmup` more, and every step whose drift is
    above DRIFT_SYNC. Their drift falls along the schedule and an early error is carried through
    every later step, so the fixed warm-up beats drift-chosen steps at an equal count
    (docs/bench/resync.md: 1.2-1.9x lower error).
    Flow models (Flux): the first step and every step whose drift is above FLOW_DRIFT_SYNC. Their
    drift grows towards the end, where the warm-up does not reach: at an equal count this had
    20-44% lower error than the fixed warm-up (same benchmark)."""
    drift = step_drift(run.sigmas, run.flow)
    if run.flow:
        return tuple(i for i, d in enumerate(drift) if d > FLOW_DRIFT_SYNC)
    steps = set(fixed_sync_steps(run.steps, warmup)) | {i for i, d in enumerate(drift) if d > DRIFT_SYNC}
    return tuple(sorted(steps))


def candidates(profile: MachineProfile, run: RunShape, warmup: int, light: tuple[int, ...] = (),
               cfg_split: bool | None = None) -> list[Candidate]:
    """Every layout of `run` on the profile's devices, with its predicted seconds per step and
    whether the fidelity rule allows it. `cfg_split` None = try both; True/False = only that."""
    world = len(profile.devices)
    order = rank_order(world, light)
    few = run.steps <= EXACT_AT_MOST
    displaced_sync = displaced_sync_steps(run, warmup)
    exact_steps = tuple(range(run.steps))
    out = []
    for k in range(1, world + 1):
        ranks = tuple(sorted(order[:k]))
        shares = speed_shares(profile, run, ranks)
        splits = [False]
        if k % 2 == 0 and run.batch % 2 == 0 and cfg_split is not False:
            splits = [True] if cfg_split is True else [False, True]
        elif cfg_split is True and k > 1:
            continue
        for split in splits:
            group = k // 2 if split else k
            if run.height // run.unit < group:
                continue  # too few rows to give every rank a band
            layout = call_layout(run, ranks, split, light, shares)
            load = max(layout.bands.heights) * run.width * (layout.chunks[0][1] - layout.chunks[0][0])
            fits = not profile.oom_load or load < profile.oom_load
            no_room = (f"would not fit: {load} image-tokens on one device, and {profile.oom_load:.0f} ran out of "
                       "device memory while this machine was profiled")
            out.append(Candidate(ranks, split, Mode.FULL_SYNC.value, exact_steps,
                                 step_seconds(profile, run, ranks, split, exact_steps, light, shares),
                                 fits, "exact" if fits else no_room))
            if group == 1:
                continue  # one rank per batch chunk: nothing to displace
            why = (f"{run.steps} steps: schedules of {EXACT_AT_MOST} steps or fewer never read stale activations"
                   if few else "displaced patch parallelism")
            out.append(Candidate(ranks, split, DISPLACED.value, displaced_sync,
                                 step_seconds(profile, run, ranks, split, displaced_sync, light, shares),
                                 not few and fits, why if fits else no_room))
    return out


def plan_run(profile: MachineProfile, run: RunShape, base: PatchParallelConfig) -> Plan:
    """The configuration for one run of `run` on the pool `profile` was measured on. `base` is the
    user's configuration (mode auto): its devices, warm-up, CFG-split wish, comm dtype and host
    device are kept; the rank count, mode and CFG split are chosen."""
    light = base.light_ranks
    options = candidates(profile, run, base.warmup_steps, light, base.cfg_split)
    one = next(c for c in options if len(c.ranks) == 1)
    allowed = [c for c in options if c.allowed]
    if not allowed:  # nothing fits by the profile's measure: the layout that spreads the image most, exact
        allowed = [max((c for c in options if c.mode == Mode.FULL_SYNC.value),
                       key=lambda c: (len(c.ranks) // (2 if c.cfg_split else 1), -c.seconds_per_step))]
    best = min(allowed, key=lambda c: c.seconds_per_step)
    if best.mode != Mode.FULL_SYNC.value:
        exact = min((c for c in allowed if c.mode == Mode.FULL_SYNC.value), key=lambda c: c.seconds_per_step)
        if exact.seconds_per_step <= best.seconds_per_step * (1 + EXACT_PREFERENCE):
            best = exact
    devices = tuple(base.devices[r] for r in best.ranks) if base.devices else ()
    comm = base.comm_dtype if best.mode != Mode.FULL_SYNC.value else CommDtype.AUTO
    config = replace(base, world_size=len(best.ranks), ranks=best.ranks, mode=best.mode, cfg_split=best.cfg_split,
                     devices=devices, comm_dtype=comm, band_shares=speed_shares(profile, run, best.ranks))
    speedup = one.seconds_per_step / best.seconds_per_step
    if len(best.ranks) == 1:
        reason = (f"one device: no layout of the {len(profile.devices)} devices is predicted faster for a "
                  f"{run.width * 8}x{run.height * 8} image, {run.steps} steps, batch {run.batch}")
    else:
        reason = f"{best.label}: predicted {speedup:.2f}x over one device"
        if run.steps <= EXACT_AT_MOST:
            reason += f" (exact: {run.steps} steps is too few to reuse stale activations)"
        elif best.mode != Mode.FULL_SYNC.value:
            reason += f", {len(best.sync_steps)} of {run.steps} steps synchronous"
    return Plan(config, best.sync_steps if best.mode != Mode.FULL_SYNC.value else tuple(range(run.steps)),
                best.seconds_per_step, one.seconds_per_step, reason, tuple(options))


def profile_key(devices: tuple[str, ...], model: str, dtype: str) -> str:
    """The file name a profile is cached under."""
    import hashlib

    text = json.dumps([list(devices), model, dtype])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def synthetic_profile(devices: int, *, per_token: float = 1.5e-6, per_pair: float = 3e-12, fixed: float = 0.01,
                      latency_s: float = 5e-5, bytes_per_s: float = 50e9, host_s: float = 0.002,
                      sync_overhead_s: float = 0.005, async_overhead_s: float = 0.005,
                      sync_bytes_per_token: float = 8e3, async_bytes_per_token: float = 8e3,
                      sync_collectives: float = 60, speeds: tuple[DeviceSpeed, ...] | None = None) -> MachineProfile:
    """A profile with given numbers (tests, and what-if tables). The defaults are estimates for
    SDXL in fp16 on one H100-class GPU (about 1.5 us per latent token per image for the
    convolutions and MLPs, 3e-12 s per token pair for attention: 0.03 s per image at 1024^2,
    0.6 s at 4096^2; 8 kB of K/V and halos per latent token), not measurements."""
    speed = DeviceSpeed(fixed, per_token, per_pair)
    return MachineProfile(tuple(f"cuda:{i}" for i in range(devices)), "synthetic", "fp16",
                          speeds or (speed,) * devices, latency_s, bytes_per_s, host_s, sync_overhead_s,
                          async_overhead_s, sync_bytes_per_token, async_bytes_per_token, sync_collectives)
