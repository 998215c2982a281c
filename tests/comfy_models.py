"""Tiny ComfyUI UNets built in-process with ComfyUI's own classes and random weights."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    # SD1.x layout: conv projections, 768-dim context in the real model (32 here), 8 heads.
    "sd15": dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                 transformer_depth=[1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 0, 0],
                 transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=32,
                 adm_in_channels=None),
    # SD2.x layout: linear projections, 64-dim heads (ComfyUI's SD20 config fixes num_head_channels=64).
    "sd2": dict(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                transformer_depth=[1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 0, 0],
                transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=48,
                adm_in_channels=None),
    # SDXL layout: linear projections, no attention at the top level, label embedding (adm).
    "sdxl": dict(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                 transformer_depth=[0, 1, 2], transformer_depth_output=[0, 0, 1, 1, 2, 2],
                 transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=64,
                 adm_in_channels=2816, num_classes="sequential"),
}


# Flux.1 layout (double- and single-stream blocks, 2x2 patches, 16-channel latent), tiny: a
# 64-wide transformer with 4 heads of 16 (rotary axes 4+6+6), text and pooled vectors of 32.
TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
             "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
             "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
             "txt_ids_dims": []}
LATENT_CHANNELS = {"flux": 16}
CONTEXT_DIM = {"flux": TINY_FLUX["context_in_dim"]}


def setup(path: str) -> None:
    """Make ComfyUI importable on CPU (idempotent)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def build(kind: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None,
          **overrides):
    """A ComfyUI BaseModel (model.diffusion_model is the UNetModel) with random weights stored in
    `dtype` and computed in `compute` (None: the same; else ComfyUI's manual_cast ops, as for an
    fp8 checkpoint). `overrides` change the UNet config (e.g. in_channels=9 makes an inpainting
    model). "sd2" is a v-prediction model, like SD2.x 768."""
    import comfy.model_base
    import comfy.supported_models

    from distri_core.zoo import randomize

    if kind == "flux":
        model_config = comfy.supported_models.Flux({**TINY_FLUX, **overrides})
        model_config.set_inference_dtype(dtype, compute)
        model = model_config.get_model({})
        randomize(model.diffusion_model, seed)
        return model.eval().requires_grad_(False)
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "use_temporal_resblock": False, "use_temporal_attention": False,
           **TINY[kind], **overrides}
    config_cls = {"sd15": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                  "sdxl": comfy.supported_models.SDXL}[kind]
    model_config = config_cls(cfg)
    model_config.set_inference_dtype(dtype, compute)
    if kind == "sd2":
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        model = model_config.get_model({})
    randomize(model.diffusion_model, seed)
    return model.eval().requires_grad_(False)


def comfy_weights():
    """The weight accessor the pool's workers use for ComfyUI models (nodes/worker_setup.py):
    comfy.ops.cast_bias_weight where the op casts or carries weight patches, else the plain
    parameters. The function itself, as the workers get it (a wrapper that loads the module on
    first use would be traced by torch.compile, and break its graphs, at every layer)."""
    return _worker_setup().comfy_weights


@functools.cache
def _worker_setup():
    spec = importlib.util.spec_from_file_location("distri_worker_setup", ROOT / "nodes" / "worker_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
