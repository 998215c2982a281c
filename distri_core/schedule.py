"""What a sampling schedule says about staleness: how much the UNet's input moves from one step to
the next, and so how wrong activations one step old are.

A displaced step reads the previous step's activations. The model's input is x scaled to unit
variance (ComfyUI's `c_in` = 1/sqrt(sigma^2 + 1) for eps models; flow models' x already is), and
a step moves x by (sigma_prev - sigma) times the model output, so the relative change of the
input a step reads stale is about |sigma_prev - sigma| / sqrt(sigma_prev^2 + 1). That is the
step's *drift*; few-step and distilled schedules have drifts near 1, DistriFusion's 50-step DDIM
around 0.05-0.1 after its first steps.

Flow-matching models (Flux; ComfyUI's CONST sampling) take x = (1 - sigma) x0 + sigma noise, which
moves by (sigma_prev - sigma)(noise - x0) with |noise - x0| ~ sqrt(2) against a size of
sqrt((1 - sigma)^2 + sigma^2): their drift is largest at the end of the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .sampling import alphas_cumprod, ddim_timesteps


def step_drift(sigmas: Sequence[float], flow: bool = False) -> list[float]:
    """Drift of every step of a schedule `sigmas` (steps + 1 values, high to low): step 0 reads
    nothing stale (inf), step i reads what step i - 1 computed at sigmas[i - 1]. `flow`: a
    flow-matching model (sigma in [0, 1])."""
    s = [float(v) for v in sigmas]
    if len(s) < 2:
        return []
    drift = [math.inf]
    for i in range(1, len(s) - 1):
        prev, step = s[i - 1], abs(s[i - 1] - s[i])
        if flow:
            drift.append(step * math.sqrt(2.0) / math.sqrt((1 - prev) ** 2 + prev ** 2))
        else:
            drift.append(step / math.sqrt(prev ** 2 + 1.0))
    return drift


def ddim_sigmas(steps: int) -> list[float]:
    """The sigma (sqrt((1 - a) / a)) of every step of the bench's DDIM loop, and 0 at the end."""
    ac = alphas_cumprod()
    return [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in ddim_timesteps(steps)] + [0.0]


def flow_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """The sigmas of the bench's flow-matching Euler loop (Flux's shifted schedule)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return [float(shift * v / (1 + (shift - 1) * v)) for v in grid]


def fixed_sync_steps(steps: int, warmup: int) -> tuple[int, ...]:
    """DistriFusion's rule: the first step and `warmup` more run synchronously."""
    return tuple(range(min(steps, warmup + 1)))


def adaptive_sync_steps(sigmas: Sequence[float], threshold: float, flow: bool = False) -> tuple[int, ...]:
    """Steps whose drift exceeds `threshold` run synchronously (step 0 always does)."""
    return tuple(i for i, d in enumerate(step_drift(sigmas, flow)) if d > threshold)
