"""The sampler wrappers that send each UNet evaluation of a Distri model to the worker pool, and
the settings they run with. Everything else (sampler, CFG, noise, inpaint blending, ControlNet,
previews) stays ComfyUI's own, on ComfyUI's own device. Support checks live in support.py, the
weights and model spec in weights.py, the host-side patcher in host.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import comfy.model_management
import comfy.patcher_extension
import torch
from comfy.ldm.flux.model import Flux

from distri_core import Mode, PatchParallelConfig
from distri_core.layers.attention import UnsupportedInputError
from distri_core.planner import Plan
from distri_core.runtime.pool import Cancelled, WorkerPool, available_devices, shared_pool
from distri_core.surgery.adapters import ComfyFluxAdapter, ComfyUNetAdapter

from .host import HostWithoutUNet, hostless, pool_memory_estimate, track_pool_memory
from .planning import make_plan, provisional
from .server_routes import notify
from .support import explain, unsupported_reasons
from .weights import COMFY_ROOT, compute_dtype, effective_weights, model_key, model_spec

log = logging.getLogger("distri_patch_parallel")

KEY = "distri_patch_parallel"
COMPILE_KEY = "torch.compile"  # comfy_api.torch_helpers.torch_compile's wrapper key
COMPILE_KWARGS = "torch_compile_kwargs"


@dataclass(frozen=True)
class DistriSettings:
    """What the Patch Parallel Config node produces (immutable: ComfyUI caches node outputs)."""

    config: PatchParallelConfig
    devices: tuple[str, ...]
    on_unsupported: str = "error"  # or "single_device"


def host_device() -> str | None:
    """The GPU ComfyUI itself computes on (CLIP, VAE, ControlNet, previews), or None on CPU."""
    device = comfy.model_management.get_torch_device()
    return str(device) if torch.device(device).type == "cuda" else None


def resolve_devices(devices: str, ranks: int) -> tuple[str, ...]:
    """'auto' = every GPU (2 CPU ranks where there is none); 'cpu' = CPU ranks; else a list."""
    text = devices.strip().lower()
    if text in ("", "auto"):
        found = available_devices()
        if not found:
            return ("cpu",) * (ranks or 2)
        if ranks and ranks > len(found):
            raise ValueError(f"ranks={ranks} but this machine has {len(found)} GPU(s) ({', '.join(found)}); "
                             f"use ranks {len(found)} or fewer, or 0 for all of them")
        return tuple(found[:ranks] if ranks else found)
    if text == "cpu":
        return ("cpu",) * (ranks or 2)
    parts = tuple(str(torch.device(p.strip())) for p in text.split(",") if p.strip())
    if ranks and ranks != len(parts):
        raise ValueError(f"devices lists {len(parts)} device(s) but ranks={ranks}; set ranks to 0 or {len(parts)}")
    available = available_devices()
    missing = [d for d in parts if d.startswith("cuda") and d not in available]
    if missing:
        raise ValueError(f"devices {missing} are not on this machine (it has {', '.join(available) or 'no GPU'}); "
                         "use 'auto' or list existing devices")
    return parts


def interrupted_here() -> BaseException:
    """ComfyUI's own interrupt exception (clearing its flag, as ComfyUI does when it raises)."""
    try:
        comfy.model_management.throw_exception_if_processing_interrupted()
    except comfy.model_management.InterruptProcessingException as e:
        return e
    return comfy.model_management.InterruptProcessingException()


class RunState:
    """Shared by the wrappers of one Distri model: the settings and the pool they use."""

    def __init__(self, settings: DistriSettings):
        self.settings = settings
        self.pool: WorkerPool | None = None
        self.run: dict = {}
        self.plan: Plan | None = None  # mode auto: this run's plan (made at its first model call)
        self.sigmas: tuple[float, ...] = ()
        self.model = None

    @property
    def auto(self) -> bool:
        return self.settings.config.mode is Mode.AUTO

    def begin(self, sigmas, shape: tuple) -> None:
        self.sigmas = tuple(float(s) for s in sigmas)
        self.plan = None
        self.run = {"state": "running", "steps": len(self.sigmas) - 1, "step": 0, "shape": list(shape), "calls": 0,
                    "busy_s": 0.0, "started": time.time()}
        notify(self.run)

    def ensure_plan(self, x, timesteps, context, extra: dict) -> None:
        """mode auto: plan this run at its first model call (measuring the machine once)."""
        if not self.auto or self.plan is not None or self.pool is None:
            return
        self.plan = make_plan(self.pool, self.model, compute_dtype(self.model), self.settings.config, self.sigmas,
                              x, timesteps, context, extra)
        self.pool.configure(self.plan.config)
        self.run["plan"] = self.plan.summary()

    def progress(self, step: int | None, sync: bool | None = None) -> None:
        run = self.run
        run["calls"] += 1
        last = self.pool.last_call if self.pool is not None else {}
        if last:
            run["busy_s"] += last.get("busy_s", 0.0)
        if step is not None:
            run["step"] = step
            self._log_step(run, step, bool(sync), last)
        elapsed = time.time() - run["started"]
        if run["step"]:
            run["sec_per_step"] = elapsed / run["step"]
        notify(run)

    def _log_step(self, run: dict, step: int, sync: bool, last: dict) -> None:
        """Per step of the run (for the panel's chart): pool seconds, whether it was exact, and
        each rank's time blocked on communication."""
        log = run.setdefault("step_log", [])
        if not log or log[-1]["step"] != step:
            log.append({"step": step, "seconds": 0.0, "sync": sync, "calls": 0, "wait_s": []})
        entry = log[-1]
        entry["calls"] += 1
        entry["sync"] = entry["sync"] or sync
        entry["seconds"] = round(entry["seconds"] + last.get("seconds", 0.0), 4)
        waits = last.get("wait_s_per_rank") or []
        entry["wait_s"] = [round(a + b, 4) for a, b in zip(entry["wait_s"] or [0.0] * len(waits), waits, strict=True)]

    def finish(self, outcome: str) -> None:
        run = self.run
        seconds = time.time() - run.get("started", time.time())
        run.update(state=outcome, seconds=seconds, step=run.get("steps", 0) if outcome == "done" else run.get("step"))
        if outcome == "done" and run.get("steps"):
            run["sec_per_step"] = seconds / run["steps"]
        if seconds > 0 and run.get("busy_s"):
            run["speedup_estimate"] = run["busy_s"] / seconds
        notify(run)

    def acquire(self, model) -> WorkerPool:
        s = self.settings
        pool = shared_pool(list(s.devices), sys_path=(COMFY_ROOT,),
                           interrupt_check=comfy.model_management.processing_interrupted)
        pool.configure(provisional(s.config))
        self.model = model
        dtype = compute_dtype(model)
        patched = sum(1 for k, v in model.patches.items() if v and k.startswith("diffusion_model."))
        kind = "transformer" if isinstance(model.model.diffusion_model, Flux) else "UNet"
        label = f"{type(model.model.model_config).__name__} {kind}, {str(dtype).replace('torch.', '')}" + \
            (f", {patched} patched weights" if patched else "")
        # The weights are computed only when the pool does not hold this model yet.
        pool.load_model(model_key(model), model_spec(model), lambda: effective_weights(model), label)
        self.pool = pool
        return pool

    def sync_for(self, step: int | None) -> bool | None:
        """Exact context for the first step plus warm-up steps of this sampling run (per step,
        so samplers that call the model twice a step count steps, not calls)."""
        if self.plan is not None:
            return self.plan.is_sync(step)
        return None if step is None else step <= self.settings.config.warmup_steps

    def exact_step(self, step: int | None) -> bool:
        """Whether this step runs with exact (synchronous) context, for the panel."""
        mode = self.plan.config.mode if self.plan is not None else self.settings.config.mode  # one device: full_sync
        return mode.value == "full_sync" or (mode.communicates and step is not None and self.sync_for(step))

    @staticmethod
    def step_of(transformer_options: dict) -> int | None:
        sigmas = transformer_options.get("sample_sigmas")
        current = transformer_options.get("sigmas")
        if sigmas is None or current is None:
            return None
        return int((sigmas.float().cpu() > current.float().max().cpu() * (1 + 1e-5)).sum())


def _check_run(guider) -> None:
    """What only shows at sampling time: per-cond hooks, and nodes after Distri Model."""
    # Hooks first: with dynamic VRAM, ComfyUI itself swaps in a plain patcher for hooked conds.
    for _name, conds in (getattr(guider, "conds", None) or {}).items():
        for c in conds:
            if c.get("hooks") is not None:
                raise UnsupportedInputError(explain(["conditioning hooks (per-prompt LoRA schedules)"]))
    patcher = guider.model_patcher
    if COMPILE_KEY in patcher.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}):
        raise UnsupportedInputError(
            "TorchCompileModel is connected after Distri Model: it would compile the host's stub of the UNet, which "
            "only forwards to the GPU workers; remove it and set compile in Patch Parallel Config, which compiles "
            "inside the workers")
    if not isinstance(patcher, HostWithoutUNet):
        raise UnsupportedInputError(
            f"a node after Distri Model rebuilt the model as a plain {type(patcher).__name__}, which would load the "
            "UNet onto ComfyUI's GPU as well; connect Distri Model (or use Distri Sampler) after the other model nodes")


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Around one sampling run: start/configure the pool, ship the model if it changed, report
    progress to the GUI, and reset stale state afterwards, also when the run failed or was
    cancelled."""
    guider = executor.class_obj
    state: RunState = guider.model_options["transformer_options"][KEY]
    _check_run(guider)
    state.begin(sigmas, tuple(latent_image.shape))
    outcome = "failed"
    try:
        state.acquire(guider.model_patcher)
        with pool_memory_estimate(guider.model_patcher.model):
            result = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        outcome = "done"
        return result
    except Cancelled as e:
        outcome = "cancelled"
        raise interrupted_here() from e
    except comfy.model_management.InterruptProcessingException:
        outcome = "cancelled"
        raise
    finally:
        state.finish(outcome)
        if state.pool is not None and state.pool.state == "ready":
            state.pool.end_run()
            track_pool_memory(state.pool)


def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """Replaces the UNet call: the pool computes it, band by band, on its devices."""
    state: RunState = transformer_options[KEY]
    comfy.model_management.throw_exception_if_processing_interrupted()
    unexpected = {k: v for k, v in kwargs.items() if v is not None}
    if unexpected:
        raise UnsupportedInputError(explain([f"extra UNet inputs {sorted(unexpected)}"]))
    ComfyUNetAdapter().check({"transformer_options": transformer_options})  # patches added per cond
    extra = {"y": y} if y is not None else {}
    if control is not None:
        extra["control"] = {k: list(v) for k, v in control.items()}
    return _in_pool(state, x, timesteps, context, transformer_options, extra)


def _in_pool(state: RunState, x, timesteps, context, transformer_options: dict, extra: dict):
    """One model call on the pool: stale state keyed by the conds it carries, exact context for the
    run's first steps, progress to the GUI."""
    key = (tuple(str(u) for u in transformer_options.get("uuids", ())),
           tuple(transformer_options.get("cond_or_uncond", ())))
    state.ensure_plan(x, timesteps, context, extra)
    step = RunState.step_of(transformer_options)
    out = state.pool(x, timesteps, context, key=key, sync=state.sync_for(step), **extra)
    state.progress(step, state.exact_step(step))
    return out


def flux_model_wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                       transformer_options={}, **kwargs):
    """Replaces a Flux transformer call (its own signature): the pool computes it, band by band."""
    state: RunState = transformer_options[KEY]
    comfy.model_management.throw_exception_if_processing_interrupted()
    if ref_latents is not None:
        raise UnsupportedInputError(explain(["reference latents (Flux Kontext / edit models: the reference image is "
                                             "attended as a whole)"]))
    unexpected = {k: v for k, v in kwargs.items() if v is not None}
    if unexpected:
        raise UnsupportedInputError(explain([f"extra transformer inputs {sorted(unexpected)}"]))
    ComfyFluxAdapter().check({"transformer_options": transformer_options})
    extra = {k: v for k, v in (("y", y), ("guidance", guidance)) if v is not None}
    if control is not None:
        extra["control"] = {k: list(v) for k, v in control.items()}
    if transformer_options.get("rope_options") is not None:  # RoPE scaling/shift nodes apply in the workers too
        extra["transformer_options"] = {"rope_options": dict(transformer_options["rope_options"])}
    return _in_pool(state, x, timestep, context, transformer_options, extra)


def parallel_model(model, settings: DistriSettings):
    """A clone of `model` whose UNet runs on the pool (or `model` itself, with a warning, when it
    cannot be split and the settings allow single-device runs)."""
    reasons = unsupported_reasons(model)
    if reasons:
        if settings.on_unsupported == "single_device":
            log.warning("%s Running on one device instead.", explain(reasons))
            return model
        raise UnsupportedInputError(explain(reasons))
    refusal = settings.config.mode.flow_refusal("Flux") if isinstance(model.model.diffusion_model, Flux) else None
    if refusal:  # before any worker starts
        raise UnsupportedInputError(f"{refusal}. Set mode to corrected_async_gn (or auto) in Patch Parallel Config.")
    m = hostless(model)
    if COMPILE_KEY in m.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}):
        log.warning("TorchCompileModel has no effect on a Distri model: it compiles the host's UNet, which only "
                    "forwards to the GPU workers; it is removed from this model so it does not trace the worker pool. "
                    "Set compile in Patch Parallel Config to compile inside the workers.")
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY)
        m.model_options.pop(COMPILE_KWARGS, None)
    m.model_options["transformer_options"][KEY] = RunState(settings)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    is_dit = isinstance(m.model.diffusion_model, Flux)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY,
                           flux_model_wrapper if is_dit else diffusion_model_wrapper)
    return m
