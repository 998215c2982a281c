"""Deterministic sampling loops for the benchmark and the tests: DDIM (eta 0, SD's scaled-linear
schedule: the paper measures 50-step DDIM) and k-diffusion Euler (ComfyUI's default `euler` with
its `simple` or `karras` schedule) for the UNets, and flow-matching Euler (Flux's shifted
schedule) for the transformers. ComfyUI users get ComfyUI's own samplers instead."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """Evenly spaced ("leading") timesteps, high to low, as diffusers' DDIMScheduler."""
    if steps < 1 or steps > train_steps:
        raise ValueError(f"steps={steps} is not valid; use 1 to {train_steps}")
    ratio = train_steps // steps
    return [i * ratio + 1 for i in range(steps)][::-1]


def alphas_cumprod(train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def ddim_sample(eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor], x: torch.Tensor, steps: int,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise `x` (pure noise at unit scale) in `steps` DDIM steps.

    eps_fn(x, timestep, step_index) returns the predicted noise for x (guidance included).
    """
    ac = alphas_cumprod()
    ts = ddim_timesteps(steps)
    for i, t in enumerate(ts):
        eps = eps_fn(x, t, i)
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if callback is not None:
            callback(i, x)
    return x


def model_sigmas(train_steps: int = 1000) -> torch.Tensor:
    """sigma(t) = sqrt((1 - a_t) / a_t) for every training timestep t (ComfyUI's
    `model_sampling.sigmas` for SD-style eps models), float64."""
    ac = alphas_cumprod(train_steps)
    return ((1 - ac) / ac) ** 0.5


def euler_schedule(steps: int, schedule: str = "simple", rho: float = 7.0) -> tuple[list[float], list[float]]:
    """(sigmas, timesteps) of ComfyUI's `euler` sampler on an eps model: `simple` (ComfyUI's
    default scheduler: every len/steps-th entry of the model's sigma table, from the top) or
    `karras` (rho = 7 between the table's extremes). sigmas has steps + 1 values (the last 0);
    timesteps are what the model is given (ComfyUI's `model_sampling.timestep`: the table index,
    interpolated in log sigma for karras)."""
    table = model_sigmas()
    n = len(table)
    if schedule == "simple":
        idx = [n - 1 - int(i * n / steps) for i in range(steps)]
        return [float(table[j]) for j in idx] + [0.0], [float(j) for j in idx]
    if schedule != "karras":
        raise ValueError(f"schedule={schedule!r} is not known; use 'simple' or 'karras'")
    lo, hi = float(table[0]) ** (1 / rho), float(table[-1]) ** (1 / rho)
    sigmas = [(hi + i / max(steps - 1, 1) * (lo - hi)) ** rho for i in range(steps)]
    logs = table.log()
    ts = []
    for s in sigmas:  # ComfyUI's timestep(): the index of log sigma in the table, linearly interpolated
        j = int(torch.searchsorted(logs, torch.tensor(math.log(s), dtype=torch.float64)).clamp(1, n - 1))
        lo_l, hi_l = float(logs[j - 1]), float(logs[j])
        ts.append(j - 1 + (math.log(s) - lo_l) / (hi_l - lo_l))
    return sigmas + [0.0], ts


# ComfyUI's `euler` loops the benchmarks run, by name: the schedule each uses.
EULER_SCHEDULES = {"euler": "simple", "euler_karras": "karras"}


def euler_sample(eps_fn: Callable[[torch.Tensor, float, int], torch.Tensor], x: torch.Tensor, steps: int,
                 callback: Callable[[int, torch.Tensor], None] | None = None, schedule: str = "simple") -> torch.Tensor:
    """Denoise `x` (pure noise at unit scale) in `steps` k-diffusion Euler steps, as ComfyUI's
    `euler` sampler runs an eps model: x_k = x * sqrt(sigma_max^2 + 1) (ComfyUI's noise scaling at
    full denoise), the model sees x_k / sqrt(sigma^2 + 1) and timestep(sigma), and
    x_k += (sigma_next - sigma) * eps. eps_fn(x, timestep, step_index) as for `ddim_sample`."""
    sigmas, ts = euler_schedule(steps, schedule)
    x = x * (sigmas[0] ** 2 + 1) ** 0.5
    for i in range(steps):
        eps = eps_fn(x / (sigmas[i] ** 2 + 1) ** 0.5, ts[i], i)
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if callback is not None:
            callback(i, x)
    return x


def flow_sample(v_fn: Callable[[torch.Tensor, float, int], torch.Tensor], x: torch.Tensor, steps: int,
                callback: Callable[[int, torch.Tensor], None] | None = None, shift: float = 3.0) -> torch.Tensor:
    """Integrate a rectified-flow model from noise (sigma 1) to data (sigma 0) in `steps` Euler
    steps on Flux's shifted schedule. v_fn(x, sigma, step_index) returns the predicted velocity;
    the model's timestep is sigma, as Flux takes it."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = [float(shift * s / (1 + (shift - 1) * s)) for s in grid]
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * v_fn(x, sigmas[i], i)
        if callback is not None:
            callback(i, x)
    return x


def guided(unet_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float) -> Callable:
    """Classifier-free guidance over a batch [cond, uncond]: unet_fn(x2, t2) -> eps2."""

    def eps_fn(x: torch.Tensor, t: int, i: int) -> torch.Tensor:
        if scale == 1.0:
            return unet_fn(x, torch.full((x.shape[0],), float(t)))
        out = unet_fn(torch.cat([x, x]), torch.full((2 * x.shape[0],), float(t)))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return eps_fn
