"""What the workers need to rebuild a ComfyUI UNet: its ModelSpec (ComfyUI's own UNetModel class
with the host's config and op family), the key that says when it changed, and its effective
weights (every weight patch applied) produced one tensor at a time, in the dtype they are
stored in (fp8 stays fp8; the workers cast per call as ComfyUI's manual_cast ops do)."""

from __future__ import annotations

import os
import uuid

import comfy.cli_args
import comfy.model_management
import comfy.ops
import torch

from distri_core.runtime.pool import LazyWeights, ModelSpec

PREFIX = "diffusion_model."
COMFY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))
WORKER_SETUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_setup.py")


def weight_dtype(model) -> torch.dtype:
    """The dtype the UNet's weights are stored in."""
    return model.model.get_dtype()


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI computes the UNet in: the model's manual-cast dtype (ModelComputeDtype
    node included, an object patch), else its weights' dtype."""
    cast = model.get_model_object("manual_cast_dtype")
    return cast if cast is not None else weight_dtype(model)


def model_key(model) -> tuple:
    """Identity of what the workers hold: the model object, its weight patches, the dtypes."""
    base = model.model
    stamp = getattr(base, "_distri_uid", None)
    if stamp is None:
        stamp = base._distri_uid = uuid.uuid4().hex
    return (stamp, str(model.patches_uuid), str(weight_dtype(model)), str(compute_dtype(model)))


def model_spec(model) -> ModelSpec:
    stored, compute = weight_dtype(model), compute_dtype(model)
    cast = stored != compute
    unet_config = dict(model.model.model_config.unet_config)
    unet_config["dtype"] = stored
    ops = comfy.ops.manual_cast if cast else comfy.ops.disable_weight_init
    args = {k: v for k, v in vars(comfy.cli_args.args).items() if isinstance(v, (bool, int, float, str, type(None)))}
    cls = type(model.model.diffusion_model)  # ComfyUI's own class: UNetModel, Flux, ...
    factory = f"{cls.__module__}:{cls.__qualname__}"
    return ModelSpec(factory, {**unet_config, "operations": ops}, compute, storage_dtype=stored if cast else None,
                     accessor=WORKER_SETUP + ":comfy_weights", setup=WORKER_SETUP + ":setup",
                     setup_kwargs={"comfy_root": COMFY_ROOT, "args": args}, sys_path=(COMFY_ROOT,))


def effective_weights(model) -> LazyWeights:
    """The UNet's weights with every weight patch (LoRA, ...) applied, on CPU in the dtype each is
    stored in, one tensor at a time.

    Starts from the unpatched weights (ComfyUI may have patched the shared model in place for an
    earlier run) and applies the patches the way ModelPatcher does, so the workers compute with
    the numbers a single-device KSampler would. Quantized weights never get here (support.py
    refuses them by name)."""
    import comfy.float
    import comfy.lora
    import comfy.utils

    cpu = torch.device("cpu")
    patches = model.get_key_patches(filter_prefix=PREFIX)

    def get(name: str) -> torch.Tensor:
        key = PREFIX + name
        (weight, convert), key_patches = patches[key][0], patches[key][1:]
        stored = weight.dtype
        if key_patches:
            work = convert(weight.to(cpu, torch.float32, copy=True), inplace=True)
            work = comfy.lora.calculate_weight(key_patches, work, key)
            weight = comfy.float.stochastic_rounding(work, stored, seed=comfy.utils.string_to_seed(key))
        for fn in model.weight_wrapper_patches.get(key, []):
            weight = fn(weight)
        return weight.to(device=cpu, dtype=stored)

    entries = [(k[len(PREFIX):], tuple(v[0][0].shape), v[0][0].dtype) for k, v in patches.items()]
    return LazyWeights(entries, get)
