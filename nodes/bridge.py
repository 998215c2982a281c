"""The translation between ComfyUI and distri_core: which models and patches can be split, how a
ModelPatcher becomes a ModelSpec plus effective weights, and the keyed wrappers that send each
UNet evaluation to the worker pool. Everything else (sampler, CFG, noise, inpaint blending,
ControlNet, previews) stays ComfyUI's own.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass

import comfy.cli_args
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from distri_core import PatchParallelConfig
from distri_core.layers.attention import UnsupportedInputError
from distri_core.runtime.pool import LazyWeights, ModelSpec, WorkerPool, available_devices, shared_pool
from distri_core.surgery.adapters import ComfyUNetAdapter

from .server_routes import notify

log = logging.getLogger("distri_patch_parallel")

KEY = "distri_patch_parallel"
COMFY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))
WORKER_SETUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_setup.py") + ":setup"
UNET_FACTORY = "comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel"

PATCH_NAMES = {
    "attn1_patch": "a self-attention patch (HyperTile, ToMe, ...)",
    "attn1_output_patch": "a self-attention output patch",
    "attn2_patch": "a cross-attention patch (IPAdapter-style)",
    "attn2_output_patch": "a cross-attention output patch",
    "middle_patch": "a transformer middle patch (GLIGEN)",
    "input_block_patch": "an input block patch (Kohya Deep Shrink)",
    "input_block_patch_after_skip": "an input block patch (Kohya Deep Shrink)",
    "output_block_patch": "an output block patch (FreeU, Kohya Deep Shrink)",
    "middle_block_after_patch": "a middle block patch",
    "forward_timestep_embed_patch": "a block replacement patch",
}


@dataclass(frozen=True)
class DistriSettings:
    """What the Patch Parallel Config node produces (immutable: ComfyUI caches node outputs)."""

    config: PatchParallelConfig
    devices: tuple[str, ...]
    on_unsupported: str = "error"  # or "single_device"


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


def unsupported_reasons(model) -> list[str]:
    """Why this ModelPatcher cannot be split into row bands (empty: it can)."""
    reasons = []
    base = model.model
    unet = getattr(base, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        reasons.append(f"the model is {type(base).__name__} ({type(unet).__name__}); only SD1.x, SD2.x and SDXL "
                       "UNets are supported")
        return reasons
    cfg = base.model_config.unet_config
    if cfg.get("use_temporal_resblock") or cfg.get("use_temporal_attention"):
        reasons.append("video UNets (SVD) are not supported")
    to = model.model_options.get("transformer_options", {})
    for name, value in (to.get("patches") or {}).items():
        if value and name not in ("emb_patch",):
            reasons.append(f"{PATCH_NAMES.get(name, 'a model patch')} ({name})")
    for name, value in (to.get("patches_replace") or {}).items():
        if value:
            reasons.append(f"an attention replacement on {name} (SAG, IPAdapter, ...)")
    if "multigpu_clones" in model.model_options:
        reasons.append("ComfyUI's MultiGPU CFG Split (use one or the other)")
    if getattr(model, "hook_patches", None):
        reasons.append("hooks (scheduled LoRA or conditioning hooks)")
    if any(getattr(model, "injections", {}).values()):
        reasons.append("bypass LoRA injections")
    if any(k.startswith("diffusion_model") for k in getattr(model, "object_patches", {})):
        reasons.append("object patches on the UNet")
    return reasons


def explain(reasons: list[str]) -> str:
    return ("Distri Patch Parallel cannot split this model into row bands: " + "; ".join(reasons) +
            ". Remove those patches, or set 'unsupported' to single_device in Patch Parallel Config to run such "
            "models on one device.")


def compute_dtype(model) -> torch.dtype:
    base = model.model
    getter = getattr(base, "get_dtype_inference", None) or base.get_dtype
    return getter()


def model_key(model, dtype: torch.dtype) -> tuple:
    """Identity of the weights the workers need: the model object, its weight patches, dtype."""
    base = model.model
    stamp = getattr(base, "_distri_uid", None)
    if stamp is None:
        stamp = base._distri_uid = uuid.uuid4().hex
    return (stamp, str(model.patches_uuid), str(dtype))


def model_spec(model, dtype: torch.dtype) -> ModelSpec:
    unet_config = dict(model.model.model_config.unet_config)
    unet_config["dtype"] = dtype
    args = {k: v for k, v in vars(comfy.cli_args.args).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return ModelSpec(UNET_FACTORY, {**unet_config, "operations": comfy.ops.disable_weight_init}, dtype,
                     setup=WORKER_SETUP, setup_kwargs={"comfy_root": COMFY_ROOT, "args": args}, sys_path=(COMFY_ROOT,))


def effective_weights(model, dtype: torch.dtype) -> LazyWeights:
    """The UNet's weights with every weight patch (LoRA, ...) applied, on CPU in `dtype`, one
    tensor at a time.

    Starts from the unpatched weights (ComfyUI may have patched the shared model in place for an
    earlier run) and applies the patches the way ModelPatcher does, so the workers compute with
    the same numbers a single-device KSampler would.
    """
    import comfy.float
    import comfy.lora
    import comfy.utils

    prefix = "diffusion_model."
    cpu = torch.device("cpu")
    patches = model.get_key_patches(filter_prefix=prefix)

    def target_dtype(w):
        return dtype if w.is_floating_point() or hasattr(w, "dequantize") else w.dtype

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        (weight, convert), key_patches = patches[key][0], patches[key][1:]
        if hasattr(weight, "dequantize"):
            weight = weight.dequantize()
        if key_patches:
            work = convert(weight.to(cpu, torch.float32, copy=True), inplace=True)
            work = comfy.lora.calculate_weight(key_patches, work, key)
            weight = comfy.float.stochastic_rounding(work, weight.dtype, seed=comfy.utils.string_to_seed(key))
        for fn in model.weight_wrapper_patches.get(key, []):
            weight = fn(weight)
        return weight.to(device=cpu, dtype=target_dtype(weight))

    entries = [(k[len(prefix):], tuple(v[0][0].shape), target_dtype(v[0][0])) for k, v in patches.items()]
    return LazyWeights(entries, get)


class RunState:
    """Shared by the wrappers of one Distri model: the settings and the pool they use."""

    def __init__(self, settings: DistriSettings):
        self.settings = settings
        self.pool: WorkerPool | None = None
        self.run: dict = {}

    def begin(self, steps: int, shape: tuple) -> None:
        self.run = {"state": "running", "steps": steps, "step": 0, "shape": list(shape), "calls": 0,
                    "busy_s": 0.0, "started": time.time()}
        notify(self.run)

    def progress(self, step: int | None) -> None:
        run = self.run
        run["calls"] += 1
        if self.pool is not None and self.pool.last_call:
            run["busy_s"] += self.pool.last_call.get("busy_s", 0.0)
        if step is not None:
            run["step"] = step
        elapsed = time.time() - run["started"]
        if run["step"]:
            run["sec_per_step"] = elapsed / run["step"]
        notify(run)

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
        pool = shared_pool(list(s.devices), sys_path=(COMFY_ROOT,))
        pool.configure(s.config)
        dtype = compute_dtype(model)
        patched = sum(1 for k, v in model.patches.items() if v and k.startswith("diffusion_model."))
        label = f"{type(model.model.model_config).__name__} UNet, {str(dtype).replace('torch.', '')}" + \
            (f", {patched} patched weights" if patched else "")
        # The weights are computed only when the pool does not hold this model yet.
        pool.load_model(model_key(model, dtype), model_spec(model, dtype), lambda: effective_weights(model, dtype),
                        label)
        self.pool = pool
        return pool

    def sync_for(self, step: int | None) -> bool | None:
        """Exact context for the first step plus warm-up steps of this sampling run (per step,
        so samplers that call the model twice a step count steps, not calls)."""
        return None if step is None else step <= self.settings.config.warmup_steps

    @staticmethod
    def step_of(transformer_options: dict) -> int | None:
        sigmas = transformer_options.get("sample_sigmas")
        current = transformer_options.get("sigmas")
        if sigmas is None or current is None:
            return None
        return int((sigmas.float().cpu() > current.float().max().cpu() * (1 + 1e-5)).sum())


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Around one sampling run: start/configure the pool, ship the model if it changed, report
    progress to the GUI, and reset stale state afterwards, also when the run failed or was
    cancelled."""
    guider = executor.class_obj
    state: RunState = guider.model_options["transformer_options"][KEY]
    for _name, conds in (getattr(guider, "conds", None) or {}).items():
        for c in conds:
            if c.get("hooks") is not None:
                raise UnsupportedInputError(explain(["conditioning hooks (per-prompt LoRA schedules)"]))
    state.begin(len(sigmas) - 1, tuple(latent_image.shape))
    pool = state.acquire(guider.model_patcher)
    outcome = "failed"
    try:
        result = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        outcome = "done"
        return result
    except comfy.model_management.InterruptProcessingException:
        outcome = "cancelled"
        raise
    finally:
        state.finish(outcome)
        if pool.state == "ready":
            pool.end_run()


def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """Replaces the UNet call: the pool computes it, band by band, on its devices."""
    state: RunState = transformer_options[KEY]
    comfy.model_management.throw_exception_if_processing_interrupted()
    unexpected = {k: v for k, v in kwargs.items() if v is not None}
    if unexpected:
        raise UnsupportedInputError(explain([f"extra UNet inputs {sorted(unexpected)}"]))
    ComfyUNetAdapter().check({"transformer_options": transformer_options})  # patches added per cond
    key = (tuple(str(u) for u in transformer_options.get("uuids", ())),
           tuple(transformer_options.get("cond_or_uncond", ())))
    extra = {"y": y} if y is not None else {}
    if control is not None:
        extra["control"] = {k: list(v) for k, v in control.items()}
    step = RunState.step_of(transformer_options)
    out = state.pool(x, timesteps, context, key=key, sync=state.sync_for(step), **extra)
    state.progress(step)
    return out


def parallel_model(model, settings: DistriSettings):
    """A clone of `model` whose UNet runs on the pool (or `model` itself, with a warning, when it
    cannot be split and the settings allow single-device runs)."""
    reasons = unsupported_reasons(model)
    if reasons:
        if settings.on_unsupported == "single_device":
            log.warning("%s Running on one device instead.", explain(reasons))
            return model
        raise UnsupportedInputError(explain(reasons))
    m = model.clone()
    if not (hasattr(m, "is_dynamic") and m.is_dynamic()):
        m.load_device = torch.device("cpu")  # the host never loads this UNet onto a GPU the pool uses
    m.model_options["transformer_options"][KEY] = RunState(settings)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return m
