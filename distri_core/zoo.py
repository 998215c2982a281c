"""Random-weight diffusers UNets of named sizes, for tests and benchmarks (no model hub here).

`micro` is for unit tests (attention at every level, seconds on CPU). `tiny` has attention
only at 1/8 of the latent resolution and channels wide enough (64-256) that its convolutions are
compute-bound like a real SD UNet's: a 2048^2 image (256^2 latent) takes about 3 s per step on
one CPU core. `small` is narrower (32-128) but adds attention at 1/4 resolution (SDXL-like: none
at the top levels), so attention dominates as it does in SDXL at 2048^2. `sd15` and `sdxl` have
the real architectures' shapes (860M / 2.6B parameters), initialised randomly.
"""

from __future__ import annotations

import torch
from torch import nn

_DOWN_PLAIN, _DOWN_ATTN = "DownBlock2D", "CrossAttnDownBlock2D"
_UP_PLAIN, _UP_ATTN = "UpBlock2D", "CrossAttnUpBlock2D"

CONFIGS: dict[str, dict] = {
    "micro": dict(block_out_channels=(32, 64), down_block_types=(_DOWN_ATTN, _DOWN_ATTN),
                  up_block_types=(_UP_ATTN, _UP_ATTN), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=8),
    "tiny": dict(block_out_channels=(64, 128, 128, 256),
                 down_block_types=(_DOWN_PLAIN, _DOWN_PLAIN, _DOWN_PLAIN, _DOWN_ATTN),
                 up_block_types=(_UP_ATTN, _UP_PLAIN, _UP_PLAIN, _UP_PLAIN), layers_per_block=1,
                 cross_attention_dim=64, attention_head_dim=8),
    "small": dict(block_out_channels=(32, 64, 64, 128),
                  down_block_types=(_DOWN_PLAIN, _DOWN_PLAIN, _DOWN_ATTN, _DOWN_ATTN),
                  up_block_types=(_UP_ATTN, _UP_ATTN, _UP_PLAIN, _UP_PLAIN), layers_per_block=1,
                  cross_attention_dim=64, attention_head_dim=8),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=(_DOWN_ATTN, _DOWN_ATTN, _DOWN_ATTN, _DOWN_PLAIN),
                 up_block_types=(_UP_PLAIN, _UP_ATTN, _UP_ATTN, _UP_ATTN), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(block_out_channels=(320, 640, 1280), down_block_types=(_DOWN_PLAIN, _DOWN_ATTN, _DOWN_ATTN),
                 up_block_types=(_UP_ATTN, _UP_ATTN, _UP_PLAIN), layers_per_block=2,
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def context_shape(name: str, batch: int = 1, tokens: int = 77) -> tuple[int, int, int]:
    return (batch, tokens, CONFIGS[name]["cross_attention_dim"])


def diffusers_config(name: str) -> dict:
    """The UNet2DConditionModel keyword arguments of a named size."""
    if name not in CONFIGS:
        raise ValueError(f"model size {name!r} is not known; use one of: {', '.join(CONFIGS)}")
    return dict(sample_size=64, in_channels=4, out_channels=4, norm_num_groups=32, **CONFIGS[name])


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights: default inits re-drawn from `seed` (on the weights' device,
    so a GPU model is filled in place), and norm affines moved away from (1, 0) so a wrong scale
    or shift shows."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for p in model.parameters():
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            noise = torch.randn(p.shape, generator=gen, device=p.device)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(noise * 0.1)
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(m.weight.float() + 1.0)  # (fp8 weights have no in-place add)
    return model


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers UNet2DConditionModel with the named configuration and random weights."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**diffusers_config(name))
    model = randomize(model, seed).eval().requires_grad_(False)
    return model.to(dtype) if dtype != torch.float32 else model


def extra_inputs(name: str, batch: int, height: int, width: int) -> dict:
    """Extra conditioning a model needs (SDXL's pooled text embedding and size ids)."""
    if name != "sdxl":
        return {}
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([height * 8, width * 8, 0, 0, height * 8, width * 8], dtype=torch.float32)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280, generator=gen),
                                  "time_ids": ids.repeat(batch, 1)}}


BUILTIN = ("tiny", "sd15", "sdxl", "flux-tiny", "flux-small")


def build_builtin(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> nn.Module:
    """distri_core.unet's plain-torch UNet or distri_core.dit's Flux-style transformer (ComfyUI's
    layouts; no diffusers, no ComfyUI) with the named shape ('tiny', 'sd15', 'sdxl', 'flux-tiny',
    'flux-small') and random weights, built directly on `device`."""
    from . import dit, unet

    with torch.device("meta"):
        model = (dit.DiT if name.startswith("flux") else unet.UNet)(**builtin_config(name))
    model = model.to(dtype).to_empty(device=device)  # no float32 copy first: SDXL is 10 GB in float32
    return randomize(model, seed).eval().requires_grad_(False)


def builtin_config(name: str) -> dict:
    """The keyword arguments of a built-in shape (distri_core.unet.UNet or distri_core.dit.DiT)."""
    from . import dit, unet

    if name not in BUILTIN:
        raise ValueError(f"built-in model {name!r} is not known; use one of: {', '.join(BUILTIN)}")
    return dict({"tiny": unet.TINY, "sd15": unet.SD15, "sdxl": unet.SDXL, "flux-tiny": dit.FLUX_TINY,
                 "flux-small": dit.FLUX_SMALL}[name])


def builtin_factory(name: str) -> str:
    """The ModelSpec factory of a built-in shape."""
    return "distri_core.dit:DiT" if name.startswith("flux") else "distri_core.unet:UNet"


def latent_channels(name: str) -> int:
    return builtin_config(name).get("in_channels", 4) if name in BUILTIN else 4


def builtin_context_dim(name: str) -> int:
    config = builtin_config(name)
    return config.get("context_dim") or config["context_in_dim"]


def builtin_extra(name: str, batch: int, device: torch.device | str = "cpu") -> dict:
    """The extra inputs a built-in shape takes: `y` (SDXL's pooled text and sizes, Flux's pooled
    vector) and Flux's guidance."""
    config = builtin_config(name)
    dim = config.get("adm_in_channels") or config.get("vec_in_dim")
    if not dim:
        return {}
    gen = torch.Generator().manual_seed(2)
    extra = {"y": torch.randn(batch, dim, generator=gen).to(device)}
    if name.startswith("flux"):
        extra["guidance"] = torch.full((batch,), 3.5, device=device)
    return extra
