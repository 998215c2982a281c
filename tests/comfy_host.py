"""Real ComfyUI in this process: the pack loaded the way ComfyUI loads custom nodes, tiny models
wrapped in ComfyUI's ModelPatcher, and conditioning as ComfyUI's nodes produce it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import comfy_models
import torch

ROOT = Path(__file__).resolve().parents[1]
H, W = 32, 24  # latent rows, columns of the node tests (H != W on purpose)


def load_pack(comfy_path: str):
    """Import the pack's root __init__.py as ComfyUI does (a package named by its folder)."""
    comfy_models.setup(comfy_path)
    import nodes  # noqa: F401  ComfyUI's nodes.py must be the top-level 'nodes' module

    name = "distri_patch_parallel_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def patcher(kind: str = "sd15", seed: int = 0, **overrides):
    """A ModelPatcher on CPU around a tiny random-weight ComfyUI model."""
    import comfy.model_patcher

    model = comfy_models.build(kind, seed, **overrides)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def conditioning(kind: str, seed: int, height: int, width: int, **extra):
    """[[cond, options]] as CLIPTextEncode produces it (SDXL adds pooled output and sizes; Flux
    a pooled vector and FluxGuidance's guidance)."""
    g = torch.Generator().manual_seed(seed)
    dim = comfy_models.CONTEXT_DIM.get(kind) or comfy_models.TINY[kind]["context_dim"]
    options = dict(extra)
    if kind == "sdxl":
        options.update(pooled_output=torch.randn(1, 1280, generator=g), width=width * 8, height=height * 8)
    if kind == "flux":
        options.setdefault("pooled_output", torch.randn(1, comfy_models.TINY_FLUX["vec_in_dim"], generator=g))
        options.setdefault("guidance", 3.5)
    return [[torch.randn(1, 7, dim, generator=g), options]]


def latent(height: int, width: int, seed: int = 3, batch: int = 1, channels: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, channels, height, width, generator=g) * 0.5}


_latent = latent  # run_pair's parameter of that name shadows it


def controlnet(kind: str = "sd15", seed: int = 7):
    """A ComfyUI ControlNet (comfy.cldm) shaped like the tiny UNet, with random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    from distri_core.zoo import randomize

    cfg = {"image_size": 32, "in_channels": 4, "use_spatial_transformer": True, "legacy": False,
           "use_checkpoint": False, "num_heads": 8, **comfy_models.TINY[kind]}
    cfg.pop("transformer_depth_output", None)
    if kind == "sdxl":
        cfg.update(num_heads=-1, num_head_channels=64)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
    randomize(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


class NodeEnv:
    """The pack's nodes as ComfyUI loaded them, next to ComfyUI's own KSampler."""

    def __init__(self, comfy_path: str):
        self.pack = load_pack(comfy_path)
        from distri_patch_parallel_pack.nodes import config_node, sampler_nodes

        import nodes as comfy_nodes

        self.ksampler = comfy_nodes.common_ksampler
        self.build_settings = config_node.build_settings
        self.Sampler = sampler_nodes.DistriSamplerNode
        self.Model = sampler_nodes.DistriModelNode


def settings(env, mode="full_sync", ranks=2, cfg_split="off", warmup=2, unsupported="error"):
    return env.build_settings("cpu", ranks, mode, warmup, cfg_split, "auto", unsupported)


def run_pair(env, model, config, *, sampler="euler", scheduler="karras", steps=6, cfg=5.0, kind="sd15",
             latent=None, denoise=1.0, positive=None, negative=None):
    """KSampler's and Distri Sampler's latents for the same inputs: (distri, ksampler)."""
    pos = positive or conditioning(kind, 1, H, W)
    neg = negative or conditioning(kind, 2, H, W)
    lat = latent or _latent(H, W)
    (ref,) = env.ksampler(model, 42, steps, cfg, sampler, scheduler, pos, neg, lat, denoise=denoise)
    out = env.Sampler.execute(model, config, 42, steps, cfg, sampler, scheduler, pos, neg, lat, denoise).args[0]
    return out["samples"], ref["samples"]


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))
