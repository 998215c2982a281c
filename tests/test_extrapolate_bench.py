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
