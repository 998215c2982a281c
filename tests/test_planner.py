"""mode = auto: the planner's choices on a table of cases (synthetic profiles), the profile's fit
and cache, and the pool running a plan on fewer ranks than it has (CPU ranks, gloo)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pool_models
import pytest

from distri_core import PatchParallelConfig
from distri_core.planner import (
    EXACT_AT_MOST,
    DeviceSpeed,
    MachineProfile,
    RunShape,
    call_seconds,
    candidates,
    plan_run,
    step_seconds,
    synthetic_profile,
)
from distri_core.runtime.pool import PoolError
from distri_core.runtime.profiling import ProfileCache, calibrate_run, fit_speed, measure, profile_heights
from distri_core.schedule import ddim_sigmas, flow_sigmas, step_drift

EXACT = 1e-4
FAST = dict(latency_s=2e-5, bytes_per_s=150e9)  # NVLink-class
SLOW = dict(latency_s=3e-4, bytes_per_s=6e9, sync_overhead_s=0.02, async_overhead_s=0.01)  # PCIe through the host


def run_shape(steps: int, cfg: float, size: int, flow: bool = False) -> RunShape:
    sigmas = flow_sigmas(steps) if flow else ddim_sigmas(steps)
    return RunShape(tuple(sigmas), 2 if cfg != 1 else 1, size // 8, size // 8, 8 if not flow else 2, flow)


def auto(devices: int) -> PatchParallelConfig:
    return PatchParallelConfig(world_size=devices, mode="auto", devices=tuple(f"cuda:{i}" for i in range(devices)))


CASES = list(itertools.product([1, 4, 8, 10, 11, 20, 50], [1.0, 7.0], [512, 1024, 2048, 4096], [1, 2, 4, 8],
                               ["fast", "slow"]))


@pytest.mark.parametrize("steps,cfg,size,devices,link", CASES,
                         ids=[f"{s}steps-cfg{c:g}-{z}px-{d}dev-{link}" for s, c, z, d, link in CASES])
def test_plan_table(steps, cfg, size, devices, link):
    profile = synthetic_profile(devices, **(FAST if link == "fast" else SLOW))
    run = run_shape(steps, cfg, size)
    plan = plan_run(profile, run, auto(devices))
    config = plan.config
    # never predicted slower than one device
    assert plan.seconds_per_step <= plan.one_device_s * (1 + 1e-9)
    # few steps never read stale activations
    if steps <= EXACT_AT_MOST:
        assert config.mode.value == "full_sync" and plan.sync_steps == tuple(range(steps))
    # a displaced run is synchronous at its first step and at every step of large drift
    if config.mode.value != "full_sync":
        drift = step_drift(run.sigmas)
        assert 0 in plan.sync_steps and all(i in plan.sync_steps for i, d in enumerate(drift) if d > 0.3)
    # a valid configuration of the pool's ranks
    assert config.world_size == len(config.pool_ranks) <= devices
    assert config.devices == tuple(f"cuda:{r}" for r in config.pool_ranks)
    if config.cfg_split:
        assert run.batch == 2 and config.world_size % 2 == 0
    chosen = [c for c in plan.candidates if (c.ranks, c.cfg_split, c.mode) ==
              (config.pool_ranks, bool(config.cfg_split), config.mode.value)]
    assert len(chosen) == 1 and chosen[0].allowed
    assert json.loads(json.dumps(plan.summary()))["mode"] == config.mode.value


def test_plan_choices_that_matter():
    # A big image on 8 fast GPUs, 50 steps with CFG: all 8 devices.
    plan = plan_run(synthetic_profile(8, **FAST), run_shape(50, 7.0, 4096), auto(8))
    assert plan.config.world_size == 8 and plan.predicted_speedup > 4
    # A small image over a slow link: one device, or CFG split alone (no exchange inside the UNet).
    plan = plan_run(synthetic_profile(2, **SLOW), run_shape(20, 7.0, 512), auto(2))
    assert plan.config.world_size == 1 or plan.config.cfg_split
    plan = plan_run(synthetic_profile(2, **SLOW), run_shape(20, 1.0, 512), auto(2))
    assert plan.config.world_size == 1 and "one device" in plan.reason
    # Turbo / Lightning: 4 steps at cfg 1 on 2 GPUs, 1024^2 (DistriFusion's users saw 2 GPUs slower than one)
    plan = plan_run(synthetic_profile(2, **SLOW), run_shape(4, 1.0, 1024), auto(2))
    assert plan.config.mode.value == "full_sync" and plan.seconds_per_step <= plan.one_device_s
    # cfg 7 on two GPUs at 1024: CFG split (no exchange at all, exact)
    plan = plan_run(synthetic_profile(2, **SLOW), run_shape(20, 7.0, 1024), auto(2))
    assert plan.config.cfg_split and plan.config.world_size == 2
    # 2048^2, 50 steps, cfg 1, 4 GPUs over PCIe: displaced beats exact (on 3 or 4 of them: the
    # link, not compute, bounds the fourth), and the choice is the fastest allowed candidate
    plan = plan_run(synthetic_profile(4, **SLOW), run_shape(50, 1.0, 2048), auto(4))
    assert plan.config.mode.value == "corrected_async_gn" and plan.config.world_size >= 3
    assert len(plan.sync_steps) < 50 and plan.predicted_speedup > 1.5
    assert plan.seconds_per_step == min(c.seconds_per_step for c in plan.candidates if c.allowed)


def test_the_host_gpu_is_the_last_one_taken_and_the_user_cfg_split_is_kept():
    base = PatchParallelConfig(world_size=4, mode="auto", devices=("cuda:0", "cuda:1", "cuda:2", "cuda:3"),
                               host_device="cuda:0")
    plan = plan_run(synthetic_profile(4, **SLOW), run_shape(20, 7.0, 1024), base)
    if plan.config.world_size < 4:
        assert 0 not in plan.config.pool_ranks
    never = PatchParallelConfig(world_size=2, mode="auto", devices=("cuda:0", "cuda:1"), cfg_split=False)
    assert not any(c.cfg_split for c in candidates(synthetic_profile(2), run_shape(20, 7.0, 1024), 4,
                                                   cfg_split=never.cfg_split))


def test_heterogeneous_devices_use_the_faster_ones_first_when_that_is_faster():
    slow, fast = DeviceSpeed(0.01, 2e-6, 0.0), DeviceSpeed(0.01, 2e-7, 0.0)
    profile = synthetic_profile(2, speeds=(slow, fast), **SLOW)
    plan = plan_run(profile, run_shape(20, 1.0, 1024), auto(2))
    assert plan.seconds_per_step <= plan.one_device_s
    assert plan.config.world_size == 2 or plan.config.pool_ranks == (1,) or plan.one_device_s <= plan.seconds_per_step


def test_fit_speed_recovers_the_curve_and_stays_non_negative():
    true = DeviceSpeed(0.02, 3e-6, 4e-10)  # attention a third of the time at the largest size
    samples = [(n, true.seconds(n, n, 1)) for n in (512.0, 2048.0, 4096.0, 8192.0)]
    fit = fit_speed(samples)
    assert fit.fixed == pytest.approx(0.02, rel=1e-3) and fit.per_token == pytest.approx(3e-6, rel=1e-3)
    assert fit.per_pair == pytest.approx(4e-10, rel=1e-2)
    # a quadratic term that only fits noise is left out (it would explode at 4096^2)
    linear = fit_speed([(1000.0, 0.101), (2000.0, 0.2), (4000.0, 0.401)])
    assert linear.per_pair == 0 and linear.per_token == pytest.approx(1e-4, rel=0.05)
    noisy = fit_speed([(100.0, 0.5), (200.0, 0.2), (400.0, 0.9)])
    assert min(noisy.fixed, noisy.per_token, noisy.per_pair) >= 0
    assert profile_heights(128, 8, 2) == [32, 64, 128] and profile_heights(16, 8, 2) == [8, 16]


def test_profile_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRI_CACHE_DIR", str(tmp_path / "profiles"))
    cache = ProfileCache()
    profile = synthetic_profile(2)
    assert cache.get(profile.devices, profile.model, profile.dtype) is None
    path = cache.put(profile)
    assert path.parent == tmp_path / "profiles"
    assert cache.get(profile.devices, profile.model, profile.dtype) == profile
    assert cache.get(("cuda:0",), profile.model, profile.dtype) is None
    path.write_text("{not json")
    assert cache.get(profile.devices, profile.model, profile.dtype) is None  # measured again, no crash
    assert cache.clear() == 1


def test_auto_is_refused_by_the_engine_and_the_pool():
    with pytest.raises(ValueError, match="mode=auto has no fixed schedule"):
        PatchParallelConfig(world_size=2, mode="auto").is_sync_call(1)
    with pool_models.micro_pool() as pool:
        with pytest.raises(PoolError, match="must be planned"):
            pool.configure(PatchParallelConfig(world_size=2, mode="auto"))
        with pytest.raises(PoolError, match="has only ranks 0-1"):
            pool.configure(PatchParallelConfig(world_size=1, ranks=(2,), mode="full_sync"))


def test_a_pool_runs_a_plan_on_fewer_ranks_and_measures_a_profile():
    """The pool measures its profile through the production path (solo calls, the all-gather probe,
    real synchronous and displaced calls), then runs plans on one rank (either one) and on both:
    every exact plan equals one device."""
    x, t, ctx, _ = __import__("tasks").inputs("diffusers", "micro", 2, 32, 24)
    ref = pool_models.micro_reference(x, t, ctx)
    with pool_models.micro_pool() as pool:
        for ranks in ((1,), (0,), (0, 1)):
            pool.configure(PatchParallelConfig(world_size=len(ranks), ranks=ranks, mode="full_sync", cfg_split=False))
            out = pool(x, t, ctx)
            assert (out - ref).abs().max() < EXACT
            idle = [w for w in range(2) if w not in ranks]
            assert pool.last_call["device_s"][idle[0]] == 0.0 if idle else pool.last_call["bytes_sent"] > 0
            pool.end_run()
        base = PatchParallelConfig(world_size=2, mode="auto")
        profile = measure(pool, x, t, ctx, {}, 4, "micro", "fp32", base)
        assert len(profile.speeds) == 2 and all(s.per_token > 0 or s.fixed > 0 for s in profile.speeds)
        assert profile.latency_s > 0 and profile.bytes_per_s > 0 and profile.sync_collectives > 0
        assert profile.sync_bytes_per_token > 0 and profile.measured["heights"] == [8, 16, 32]
        assert MachineProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
        # Calibrated at the run's own batch and size: one device alone, synchronous, displaced.
        (first,) = profile.calibrations
        assert (first["batch"], first["height"], first["width"]) == (2, 32, 24)
        assert set(first["calls"]) == {"one", "sync", "async"} and first["calls"]["one"]["bytes_sent"] == 0
        one = x[:1, :, :16].contiguous()
        profile = calibrate_run(pool, profile, one, t[:1], ctx[:1], {}, 4, base)
        assert [(c["batch"], c["height"]) for c in profile.calibrations] == [(2, 32), (1, 16)]
        assert profile.calibrated_at(RunShape((1.0, 0.0), 1, 16, 24, 4))
        assert not profile.calibrated_at(RunShape((1.0, 0.0), 1, 32, 24, 4))
        for steps, cfg in ((6, 7.0), (20, 1.0)):
            plan = plan_run(profile, RunShape(tuple(ddim_sigmas(steps)), x.shape[0] if cfg != 1 else 1, 32, 24, 4),
                            base)
            pool.configure(plan.config)
            xx = x if cfg != 1 else x[:1]
            out = pool(xx, t[:xx.shape[0]], ctx[:xx.shape[0]], sync=plan.is_sync(0))
            assert (out - pool_models.micro_reference(xx, t[:xx.shape[0]], ctx[:xx.shape[0]])).abs().max() < EXACT
            pool.end_run()


def test_flow_models_resync_where_their_drift_is_large():
    """Flux's drift grows towards the end of its schedule: a displaced Flux run is synchronous at
    its first step and wherever drift > 0.12 (docs/bench/resync.md), not over a fixed warm-up."""
    from distri_core.planner import FLOW_DRIFT_SYNC, displaced_sync_steps

    run = run_shape(20, 1.0, 2048, flow=True)
    steps = displaced_sync_steps(run, 4)
    drift = step_drift(run.sigmas, flow=True)
    assert steps[0] == 0 and steps == tuple(i for i, d in enumerate(drift) if d > FLOW_DRIFT_SYNC)
    assert steps[-1] == 19 and 1 not in steps  # the end of the schedule, not a warm-up
    eps = displaced_sync_steps(run_shape(20, 1.0, 2048), 4)
    assert eps[:5] == (0, 1, 2, 3, 4)


def test_calibration_adds_the_layers_cost_or_scales_a_cheaper_band():
    from distri_core.planner import call_seconds
    from distri_core.runtime.profiling import calibrate

    profile = synthetic_profile(2, **SLOW)
    run = RunShape((1.0, 0.0), 1, 64, 64, 8)
    ranks = (0, 1)
    bare_sync = call_seconds(profile, run, ranks, False, True)
    bare_async = call_seconds(profile, run, ranks, False, False)
    slower = calibrate(profile, run, ranks, (), bare_sync + 0.1, bare_async + 0.05)
    assert slower.sync_overhead_s == pytest.approx(SLOW["sync_overhead_s"] + 0.1)
    assert slower.async_overhead_s == pytest.approx(SLOW["async_overhead_s"] + 0.05)
    assert call_seconds(slower, run, ranks, False, False) == pytest.approx(bare_async + 0.05)
    profile = synthetic_profile(2, sync_overhead_s=0.0, async_overhead_s=0.0, **FAST)  # compute-bound
    bare_sync = call_seconds(profile, run, ranks, False, True)
    bare_async = call_seconds(profile, run, ranks, False, False)
    faster = calibrate(profile, run, ranks, (), bare_sync * 0.5, bare_async * 0.8)
    assert faster.sync_scale == 1.0 and faster.sync_overhead_s == 0.0  # never a scale from a blocking call
    assert faster.async_scale < 1.0 and call_seconds(faster, run, ranks, False, False) == pytest.approx(
        bare_async * 0.8, rel=0.02)


def test_a_run_is_predicted_with_the_calibration_nearest_its_load():
    """Calibrated on one image at half the height, a two-image call at full height was predicted
    34-40% too fast (docs/bench/plan.md): each run takes the calibration measured nearest its
    load, the same shape when there is one."""
    cal = dict(host_s=0.001, sync_overhead_s=0.0, async_overhead_s=0.0, sync_scale=1.0, one_overhead_s=0.0,
               one_scale=1.0)
    small = {"batch": 1, "height": 32, "width": 64, **cal, "async_scale": 0.5}
    big = {"batch": 2, "height": 64, "width": 64, **cal, "async_scale": 1.0, "async_overhead_s": 0.05}
    failed = {"batch": 2, "height": 128, "width": 128, "out_of_memory": True}
    profile = replace(synthetic_profile(2, **SLOW), calibrations=(small, big, failed))
    assert profile.for_run(RunShape((1.0, 0.0), 2, 64, 64, 8)).async_overhead_s == 0.05
    assert profile.for_run(RunShape((1.0, 0.0), 1, 40, 64, 8)).async_scale == 0.5
    assert profile.for_run(RunShape((1.0, 0.0), 2, 128, 128, 8)).async_overhead_s == 0.05  # nearest measured
    assert profile.calibrated_at(RunShape((1.0, 0.0), 2, 128, 128, 8))  # out of memory there: not tried again
    assert MachineProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    run = RunShape(tuple(ddim_sigmas(20)), 2, 64, 64, 8)
    slow = step_seconds(profile, run, (0, 1), False, (0,))
    assert slow == pytest.approx(step_seconds(profile.for_run(run), run, (0, 1), False, (0,)))
    assert slow > step_seconds(replace(profile, calibrations=(small,)), run, (0, 1), False, (0,))
    assert synthetic_profile(2).for_run(run) == synthetic_profile(2)  # no calibration: the profile's own fields


def test_one_device_alone_is_calibrated_too():
    from distri_core.runtime.profiling import calibrate

    profile = synthetic_profile(2, **SLOW)
    run = RunShape((1.0, 0.0), 2, 64, 64, 8)
    bare = call_seconds(profile, run, (0,), False, True)
    slower = calibrate(profile, run, (0, 1), (), None, None, bare + 0.01, 0)
    assert slower.one_overhead_s == pytest.approx(0.01) and call_seconds(slower, run, (1,), False, True) == (
        pytest.approx(bare + 0.01))
    faster = calibrate(profile, run, (0, 1), (), None, None, bare * 0.7, 0)
    assert faster.one_scale < 1.0 and call_seconds(faster, run, (0,), False, True) == pytest.approx(bare * 0.7)
    # CFG split (one rank per image) keeps the solo curve: both ranks busy, as when it was measured
    assert call_seconds(faster, run, (0, 1), True, True) == call_seconds(profile, run, (0, 1), True, True)


def test_a_whole_image_that_does_not_fit_one_device_is_profiled_and_never_planned_on_one():
    """On a small GPU the solo timing of the whole image runs out of memory (imitated: a model that
    raises CUDA's OutOfMemoryError above a load): the profile keeps what fitted, records the load,
    and the plan spreads the image instead of failing or choosing one device."""
    from pathlib import Path

    from distri_core.runtime.pool import ModelSpec

    x, t, ctx, _ = __import__("tasks").inputs("diffusers", "micro", 1, 32, 24)
    spec = ModelSpec("pool_models:small_gpu_factory", {**pool_models.micro_spec().kwargs, "max_load": 500},
                     sys_path=(str(Path(__file__).parent),))
    with pool_models.micro_pool() as pool:
        pool.load_model("small-gpu", spec, pool_models.micro_weights)
        base = PatchParallelConfig(world_size=2, mode="auto")
        profile = measure(pool, x, t, ctx, {}, 4, "micro-small-gpu", "fp32", base)
        assert profile.oom_load == 32 * 24 and len(profile.measured["solo_s"][0]) == 2
        plan = plan_run(profile, RunShape(tuple(ddim_sigmas(6)), 1, 32, 24, 4), base)
        assert plan.config.world_size == 2 and plan.config.mode.value == "full_sync"
        one = next(c for c in plan.candidates if len(c.ranks) == 1)
        assert not one.allowed and "would not fit" in one.why
        pool.configure(plan.config)
        out = pool(x, t, ctx)
        assert (out - pool_models.micro_reference(x, t, ctx)).abs().max() < EXACT


def test_a_slower_gpu_gets_a_smaller_band():
    """Mixed GPUs (one half as fast): auto sizes the bands by measured speed so they finish
    together, and predicts that faster than even bands; identical GPUs keep even bands."""
    from distri_core.layout import plan_bands
    from distri_core.planner import speed_shares

    fast, slow = DeviceSpeed(0.01, 1.5e-6, 3e-12), DeviceSpeed(0.01, 3e-6, 6e-12)
    profile = synthetic_profile(2, speeds=(fast, slow), **FAST)
    run = run_shape(50, 1.0, 2048)
    shares = speed_shares(profile, run, (0, 1))
    assert shares == (1.0, 0.5)
    plan = plan_run(profile, run, auto(2))
    assert plan.config.band_shares == shares and plan.summary()["band_shares"] == [1.0, 0.5]
    assert plan_bands(run.height, 2, run.unit, shares=shares).heights == (168, 88)  # 2:1 in blocks of 8 rows
    even = step_seconds(profile, run, (0, 1), False, plan.sync_steps, shares=())
    assert plan.seconds_per_step < 0.8 * even
    assert speed_shares(synthetic_profile(2, **FAST), run, (0, 1)) == ()  # identical GPUs: even bands
    with pytest.raises(ValueError, match="band_shares=\\[1.0\\] is not valid for world_size=2"):
        PatchParallelConfig(world_size=2, band_shares=(1.0,))
