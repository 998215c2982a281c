"""The re-synchronisation experiment: its sync-step rules, and its loops (every step synchronous
equals one device; fewer synchronous steps do not)."""

from __future__ import annotations

import math

from distri_core import resync_bench as rb
from distri_core.schedule import adaptive_sync_steps, ddim_sigmas, step_drift


def test_adaptive_selection_takes_budget_steps_with_step_zero():
    for model, steps in (("tiny", 20), ("tiny", 50), ("flux-tiny", 20)):
        drift = rb.loop_drift(model, steps)
        assert len(drift) == steps and math.isinf(drift[0])
        for budget in (1, 2, 3, 5, 8, steps):
            chosen = rb.select_adaptive(drift, budget)
            assert len(chosen) == budget and chosen[0] == 0 and list(chosen) == sorted(set(chosen))
            # The largest drifts: nothing left out drifts more than anything chosen.
            left = [drift[i] for i in range(steps) if i not in chosen]
            assert not left or max(left) <= min(drift[i] for i in chosen)
            assert rb.select_fixed(steps, budget) == tuple(range(budget))
    # The same set as schedule's threshold rule at the threshold the plan records.
    sigmas = ddim_sigmas(20)
    plan = next(p for p in rb.sync_plans(step_drift(sigmas), [8]) if p["variant"] == "adaptive")
    assert adaptive_sync_steps(sigmas, plan["threshold"]) == plan["sync_steps"]
    # Flow-matching drift grows to the end: the adaptive steps are the last ones.
    assert rb.select_adaptive(rb.loop_drift("flux-tiny", 20), 3) == (0, 18, 19)


def test_accumulated_rule_and_its_bisection():
    drift = [math.inf, 0.3, 0.3, 0.3, 0.3, 0.3]
    assert rb.accumulated_sync_steps(drift, 0.5) == (0, 2, 4)  # 0.6 > 0.5 after two steps
    assert rb.accumulated_sync_steps(drift, 0.0) == tuple(range(6))
    assert rb.accumulated_sync_steps(drift, 10.0) == (0,)
    for budget, count in ((1, 1), (2, 2), (3, 3), (4, 3), (5, 6), (6, 6)):  # 4 and 5: no threshold gives them
        steps, threshold = rb.select_accumulated(drift, budget)
        assert steps[0] == 0 and rb.accumulated_sync_steps(drift, threshold) == steps
        assert len(steps) == count
    for budget in (2, 3, 5, 8):
        steps, _ = rb.select_accumulated(rb.loop_drift("tiny", 20), budget)
        assert steps[0] == 0 and abs(len(steps) - budget) <= 1


def test_all_steps_sync_equals_one_device_and_fewer_do_not():
    steps = 4
    run = rb.run_loops("micro", 128, steps, [tuple(range(steps)), (0, 1), (0,)], ranks=2, timeout=120)
    exact, warm, cold = run["errors"]
    assert exact["max_abs_err"] < 1e-4
    assert warm["mean_abs_err"] > 1e-4 and cold["mean_abs_err"] > 1e-4
    assert len(run["latents"]) == 3 and run["reference"].shape == run["latents"][0].shape
