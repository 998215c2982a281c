"""Which ComfyUI models and patches the worker pool can run band by band, and the message that
says why one cannot (with the fix). Every refusal names the thing refused."""

from __future__ import annotations

import torch
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from distri_core.surgery.adapters import COMFY_SAFE_PATCHES

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
    "emb_patch": "a timestep-embedding patch (a host function the GPU workers cannot run)",
}

# The op families a worker can rebuild exactly: weights stored as they are (disable_weight_init)
# or cast per call to the compute dtype (manual_cast, e.g. fp8 weights computed in fp16/bf16).
PLAIN_OPS = ("disable_weight_init", "manual_cast")
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def op_families(unet: torch.nn.Module) -> set[str]:
    """The comfy.ops families the UNet's layers come from ({'manual_cast'}, ...); a layer that is
    not a comfy.ops class (custom operations: GGUF, NF4, ...) appears as its class name."""
    families = set()
    for m in unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            cls = type(m)
            inside = cls.__module__ == "comfy.ops" and "." in cls.__qualname__
            families.add(cls.__qualname__.split(".")[0] if inside else f"{cls.__module__}.{cls.__qualname__}")
    return families


def weight_reasons(model) -> list[str]:
    """Why the UNet's weights cannot be rebuilt exactly in a worker (quantized, custom ops)."""
    reasons = []
    base = model.model
    config = base.model_config
    if type(model).__name__ == "GGUFModelPatcher" or getattr(config, "custom_operations", None) is not None:
        ops = getattr(config, "custom_operations", None)
        reasons.append(f"custom layer operations ({getattr(ops, '__name__', type(model).__name__)}: GGUF, NF4 or "
                       "similar quantized loaders); load a safetensors checkpoint in fp16, bf16 or fp8 instead")
        return reasons
    if getattr(config, "quant_config", None):
        reasons.append("a quantized checkpoint (scaled fp8 / mixed-precision QuantizedTensor weights); load a plain "
                       "fp16, bf16 or fp8_e4m3fn checkpoint, or the model with UNETLoader weight_dtype fp8_e4m3fn")
        return reasons
    families = op_families(base.diffusion_model)
    if len(families) != 1 or not families <= set(PLAIN_OPS):
        hint = " (fp8 matrix multiplication: UNETLoader fp8_e4m3fn_fast or --fast fp8_matrix_mult)" \
            if "fp8_ops" in families else ""
        reasons.append(f"layer operations {', '.join(sorted(families))}{hint}, which the workers do not rebuild; "
                       "load the UNet with weight_dtype default or fp8_e4m3fn")
        return reasons
    odd = sorted({f"{type(p).__name__} {p.dtype}" for p in base.diffusion_model.parameters()
                  if type(p) not in (torch.Tensor, torch.nn.Parameter) or p.dtype not in STORED_DTYPES})
    if odd:
        reasons.append(f"weights of a kind the workers cannot receive ({', '.join(odd[:3])})")
    return reasons


def unsupported_reasons(model) -> list[str]:
    """Why this ModelPatcher cannot be split into row bands (empty: it can)."""
    reasons = []
    base = model.model
    unet = getattr(base, "diffusion_model", None)
    if not isinstance(unet, (UNetModel, Flux)):
        reasons.append(f"the model is {type(base).__name__} ({type(unet).__name__}); supported are SD1.x, SD2.x and "
                       "SDXL UNets and Flux (see the README for the other DiTs)")
        return reasons
    cfg = base.model_config.unet_config
    if cfg.get("use_temporal_resblock") or cfg.get("use_temporal_attention"):
        reasons.append("video UNets (SVD) are not supported")
    reasons += weight_reasons(model)
    to = model.model_options.get("transformer_options", {})
    for name, value in (to.get("patches") or {}).items():
        if value and name not in COMFY_SAFE_PATCHES:
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
