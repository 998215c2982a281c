"""The extrapolation experiment: its factor, and its buffers (all steps synchronous equals one
device; factor 0 equals plain corrected_async_gn exactly; a nonzero factor changes the result)."""

from __future__ import annotations

import torch

from distri_core import extrapolate_bench as eb
from distri_core.schedule import ddim_sigmas


def test_factors_follow_the_sigma_schedule():
    s = [10.0, 8.0, 7.0, 6.5, 6.5, 0.0]
    assert eb.extrapolation_factors(s) == [0.0, 0.0, 0.5, 0.5, 0.0]  # 0/0.5 and a repeated sigma
    assert eb.extrapolation_factors([1.0, 0.9, 0.5, 0.4]) == [0.0, 0.0, 1.0]  # 4x clamped to 1
    for model, steps in (("tiny", 20), ("flux-tiny", 20), ("tiny", 50)):
        f = eb.extrapolation_factors(eb.loop_sigmas(model, steps))
        assert len(f) == steps and f[:2] == [0.0, 0.0] and all(0.0 <= v <= 1.0 for v in f)
    sig = ddim_sigmas(20)
    assert abs(eb.extrapolation_factors(sig)[5] - (sig[5] - sig[4]) / (sig[4] - sig[3])) < 1e-12


def test_variant_sync_equals_one_device_and_factor_zero_equals_plain():
    steps = 5
    runs = [("corrected_async_gn", steps), ("extrapolated", steps),  # every step synchronous
            ("corrected_async_gn", 1), ("extrapolated", 1, 0.0), ("extrapolated", 1), ("extrapolated_gn", 1)]
    run = eb.run_loops("micro", 128, steps, runs, ranks=2, timeout=120)
    sync_plain, sync_extra, plain, zero, extra, extra_gn = run["runs"]
    # (a) synchronous steps are never extrapolated: the variant equals one device.
    assert sync_extra["errors"]["max_abs_err"] < 1e-4
    assert torch.equal(sync_extra["latent"], sync_plain["latent"])
    # (b) factor 0: the same as plain corrected_async_gn, bit for bit.
    assert plain["errors"]["mean_abs_err"] > 1e-4
    assert torch.equal(zero["latent"], plain["latent"])
    # A nonzero factor does change the displaced steps; the history costs memory, no traffic.
    assert not torch.equal(extra["latent"], plain["latent"])
    assert not torch.equal(extra_gn["latent"], extra["latent"])
    assert plain["extra_bytes"] == 0 and 0 < extra["extra_bytes"] < extra_gn["extra_bytes"]
    assert extra["extra_bytes"] <= extra["stale_bytes"] // 2  # the other rank's half, K/V and halos only
    assert extra["latent"].shape == run["reference"].shape and run["factors"][:2] == [0.0, 0.0]


def test_the_engines_mode_is_the_experiments_timestep_rule():
    # corrected_extrapolated (runtime.extrapolation: per bucket, two storages taking turns, f on the
    # device) against the experiment's own per-exchange buffers with the same rule (f from the
    # timesteps, in Python floats): two implementations, one result, on ComfyUI's euler (simple
    # schedule: f = 1 after two calls). The benchmark's JSON shows the same on DDIM and karras.
    steps = 6
    runs = [("corrected_async_gn", 1), ("extrapolated_t", 1), ("corrected_extrapolated", 1)]
    for kind in ("euler",):
        run = eb.run_loops("micro", 128, steps, runs, ranks=2, timeout=120, sampler_kind=kind)
        plain, experiment, mode = run["runs"]
        scale = float(run["reference"].abs().max())
        assert float((mode["latent"] - experiment["latent"]).abs().max()) < 1e-5 * scale, kind
        assert not torch.equal(mode["latent"], plain["latent"])  # whether it helps is the benchmark's question
        # The second storages: the extrapolated exchanges' buckets once more (all ranks' rows).
        assert experiment["extra_bytes"] < mode["extra_bytes"] <= mode["stale_bytes"], (experiment, mode)
        assert mode["stale_bytes"] == plain["stale_bytes"]


def test_the_factor_follows_the_timesteps_on_the_device():
    from distri_core.opcount import OpCounter
    from distri_core.runtime.extrapolation import ExtrapolatingBuffers
    from distri_core.runtime.stats import CommStats

    buffers = ExtrapolatingBuffers(None, 0, 2, None, True, CommStats())
    timesteps = [torch.tensor([t, t]) for t in (999.0, 949.0, 899.0, 874.0, 874.0, 800.0, 900.0)]
    factors = []
    with OpCounter() as counter:
        for t in timesteps:
            buffers.observe(t)
            factors.append(buffers.factor)
    seen = [float(f) for f in factors]
    # 0 until two earlier calls; then (t - t1) / (t1 - t2) clamped to [0, 1]: 1, 0.5, 0 (no step),
    # 0 (t1 == t2), and 0 where the timesteps turn back.
    assert seen == [0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0], seen
    assert counter.host_waits == {}, counter.host_waits  # nothing read back, nothing copied from the host
    buffers.observe(3)  # a number: the same, on the timesteps' device
    assert buffers.factor.dim() == 0 and buffers.factor.dtype == torch.float32
