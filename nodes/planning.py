"""mode = auto in ComfyUI: the run's shape (sigmas, batch, latent size, model) handed to
distri_core.planner, with the machine profile measured from the run's first model call and cached
per devices, model and dtype."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

import comfy.model_sampling
import torch

from distri_core import Mode, PatchParallelConfig
from distri_core.planner import MachineProfile, Plan, RunShape, plan_run
from distri_core.runtime.profiling import ProfileCache, calibrate_run, measure
from distri_core.schedule import ddim_sigmas

log = logging.getLogger("distri_patch_parallel")

CACHE = ProfileCache()
_profiles: dict[tuple, MachineProfile] = {}  # this process's profiles (also on disk)
last_plan: dict = {}  # the plan of the current or last run, for /distri/plan and the panel


def model_name(model) -> str:
    """The profile's model key: the architecture and its shape, not its weights (a LoRA or another
    fine-tune of the same architecture runs at the same speed)."""
    config = model.model.model_config
    shape = json.dumps({k: v for k, v in sorted(config.unet_config.items()) if isinstance(v, (int, float, str, list,
                                                                                             tuple, bool))},
                       sort_keys=True, default=str)
    return f"{type(config).__name__}-{hashlib.sha256(shape.encode()).hexdigest()[:10]}"


def is_flow(model) -> bool:
    return isinstance(model.model.model_sampling, comfy.model_sampling.CONST)


def provisional(config: PatchParallelConfig) -> PatchParallelConfig:
    """What the pool runs before a plan exists (loading, profiling): exact, on every rank."""
    if config.mode is not Mode.AUTO:
        return config
    return replace(config, mode=Mode.FULL_SYNC, comm_dtype="auto")


def profile_for(pool, model, dtype: torch.dtype, config: PatchParallelConfig, x, timesteps, context,
                extra: dict) -> MachineProfile:
    name, dtype_name = model_name(model), str(dtype).replace("torch.", "")
    key = (tuple(pool.devices), name, dtype_name)
    profile = _profiles.get(key) or CACHE.get(*key)
    unit = pool.model_info.get("unit") or 8
    extra = {k: v for k, v in extra.items() if k != "control"}
    shape = RunShape((1.0, 0.0), x.shape[0], x.shape[2], x.shape[3], unit)
    if profile is None or not profile.calibrated_at(shape):
        if profile is None:
            log.info("Distri auto: measuring this machine for %s on %s (once; cached in %s)", name,
                     ", ".join(pool.devices), CACHE.directory)
            profile = measure(pool, x, timesteps, context, extra, unit, name, dtype_name, config)
        else:
            log.info("Distri auto: calibrating %s on %s at %d x %dx%d latents (once per size)", name,
                     ", ".join(pool.devices), x.shape[0], x.shape[3], x.shape[2])
            profile = calibrate_run(pool, profile, x, timesteps, context, extra, unit, config)
        try:
            CACHE.put(profile)
        except OSError as e:
            log.warning("could not cache the machine profile in %s: %s", CACHE.directory, e)
    _profiles[key] = profile
    return profile


def preview_plan(config: PatchParallelConfig, batch: int, height: int, width: int, unit: int,
                 steps: int) -> Plan | None:
    """The plan auto would choose for an image of this size (a standard schedule of `steps`), from
    the last profile measured on these devices; None before any was."""
    devices = tuple(config.devices)
    profile = next((p for (d, _, _), p in reversed(list(_profiles.items())) if d == devices), None)
    if profile is None or height % unit or steps < 1:
        return None
    return plan_run(profile, RunShape(tuple(ddim_sigmas(steps)), batch, height, width, unit), config)


def make_plan(pool, model, dtype, config: PatchParallelConfig, sigmas, x, timesteps, context, extra: dict) -> Plan:
    """The plan of this run, from its first model call's inputs."""
    profile = profile_for(pool, model, dtype, config, x, timesteps, context, extra)
    run = RunShape(tuple(float(s) for s in sigmas), x.shape[0], x.shape[2], x.shape[3],
                   pool.model_info.get("unit") or 8, is_flow(model))
    plan = plan_run(profile, run, config)
    log.info("Distri auto: %s", plan.to_text().replace("\n", "; "))
    last_plan.clear()
    last_plan.update(plan.summary(), image_px=[x.shape[3] * 8, x.shape[2] * 8], steps=run.steps, batch=run.batch)
    return plan


def forget_profiles() -> int:
    """Measure every machine profile again at the next auto run."""
    _profiles.clear()
    return CACHE.clear()
