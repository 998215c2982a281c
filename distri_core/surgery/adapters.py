"""The two UNet families: how to call them and how to cut their inputs to a batch chunk and a
row band. Recognised by their structure (duck typing), so this package never imports ComfyUI.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

from ..layers.attention import UnsupportedInputError
from .walk import UnsupportedModelError, slice_rows

log = logging.getLogger("distri_core")

# ComfyUI transformer_options patch kinds a row band can run as they are. None today: every patch
# kind sees spatial shapes, masks or whole blocks, and the one that does not (emb_patch, which
# changes the timestep embedding) is a host-side function the workers cannot receive.
COMFY_SAFE_PATCHES: frozenset[str] = frozenset()


def chunk_batch(value: Any, start: int, stop: int, batch: int) -> Any:
    """Cut every tensor whose first dim is the batch to [start, stop) (recursing into
    dicts, lists and tuples); everything else passes through."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch and (start, stop) != (0, batch):
            return value[start:stop]
        return value
    if isinstance(value, dict):
        return {k: chunk_batch(v, start, stop, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(chunk_batch(v, start, stop, batch) for v in value)
    return value


def band_spatial(value: Any, start: int, stop: int, height: int) -> Any:
    """Cut every 4-D tensor (a residual added inside the UNet) to its row band."""
    if isinstance(value, torch.Tensor):
        return slice_rows(value, start, stop, height) if value.dim() == 4 else value
    if isinstance(value, dict):
        return {k: band_spatial(v, start, stop, height) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(band_spatial(v, start, stop, height) for v in value)
    return value


MEMORY_SIZED_ATTENTION = ("attention_sub_quad", "attention_split")


class UNetAdapter:
    """Calls one UNet family on a chunk/band. `spatial` names inputs holding per-level residuals."""

    family = "unet"
    flow = False  # a flow-matching model (its input moves most at the end of the schedule)
    spatial: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def bind(self, model: nn.Module) -> UNetAdapter:
        """Read what the adapter needs of this model (its patch size, ...)."""
        return self

    @staticmethod
    def input_conv(model: nn.Module) -> nn.Module | None:
        """The convolution applied to the UNet's input latent (every rank holds all of that input,
        so its halo needs no exchange)."""
        return None

    @staticmethod
    def attention_namespace(model: nn.Module):
        """The module whose `attention` function a DiT's blocks call (None for UNets)."""
        return None

    @staticmethod
    def min_unit(model: nn.Module) -> int:
        """Latent rows a band must be a multiple of, beyond what the model's downsamplers need."""
        return 1

    def eager_under_compile(self, model: nn.Module) -> list[tuple[object, str]]:
        """(namespace, name) of the functions the model's modules call through a module global
        that must run eagerly when the engine compiles (`compile`): attention kernels that size
        their chunks from the device's free memory (ComfyUI's sub-quadratic and split attention,
        its defaults on CPU and with --use-split-cross-attention). Compiled, the free memory
        becomes a guard that fails at every call, so every call would compile again."""
        spaces = {type(m).__module__ for m in model.modules()}
        namespace = self.attention_namespace(model)
        attention = getattr(namespace, "attention", None) if namespace is not None else None
        attention = getattr(attention, "original", attention)  # the joint-attention dispatch's own
        spaces.add(getattr(attention, "__module__", None) or "")
        out = []
        for name in sorted(s for s in spaces if s):
            ns = sys.modules.get(name)
            for attr in ("optimized_attention", "optimized_attention_masked"):
                fn = getattr(ns, attr, None)
                if callable(fn) and getattr(fn, "__name__", "") in MEMORY_SIZED_ATTENTION:
                    out.append((ns, attr))
        return out

    @staticmethod
    def prefix_tokens(context) -> int:
        """Tokens a DiT puts before the image's in its joint sequence (0 for UNets)."""
        return 0

    @staticmethod
    def output_channels(model: nn.Module) -> int | None:
        """Channels of the model's output latent."""
        config = getattr(model, "config", None)
        return getattr(config, "out_channels", None) if config is not None else getattr(model, "out_channels", None)

    def check(self, kwargs: dict) -> None:
        for name in self.refused:
            if kwargs.get(name) is not None:
                raise UnsupportedInputError(f"{name} cannot be split into row bands (it spans the whole image); "
                                            f"remove it or run on one device")

    def cut(self, kwargs: dict, chunk: tuple[int, int], batch: int, rows: tuple[int, int], height: int) -> dict:
        out = {}
        for k, v in kwargs.items():
            v = chunk_batch(v, chunk[0], chunk[1], batch)
            if k in self.spatial:
                v = band_spatial(v, rows[0], rows[1], height)
            out[k] = v
        return out

    def __call__(self, model: nn.Module, x, timesteps, context, **kwargs) -> torch.Tensor:
        raise NotImplementedError


class ComfyUNetAdapter(UNetAdapter):
    """ComfyUI's `UNetModel` (SD1.x, SD2.x, SDXL): forward(x, timesteps, context, y, control,
    transformer_options)."""

    family = "comfy"
    spatial = ("control",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("input_blocks", "middle_block", "output_blocks", "out"))

    @staticmethod
    def input_conv(model: nn.Module) -> nn.Module | None:
        first = model.input_blocks[0][0]
        return first if isinstance(first, nn.Conv2d) else None

    def check(self, kwargs: dict) -> None:
        super().check(kwargs)
        to = kwargs.get("transformer_options") or {}
        found = [f"patches.{k}" for k, v in (to.get("patches") or {}).items() if v and k not in COMFY_SAFE_PATCHES]
        found += [f"patches_replace.{k}" for k, v in (to.get("patches_replace") or {}).items() if v]
        if found:
            raise UnsupportedInputError(
                f"model patches {', '.join(sorted(found))} act on whole-image activations and cannot be split "
                "into row bands; remove them (e.g. FreeU, HyperTile, Deep Shrink, attention patches) or run on "
                "one device"
            )
        for k in ("num_video_frames", "image_only_indicator", "time_context"):
            if kwargs.get(k) is not None:
                raise UnsupportedInputError(f"{k}: video UNets are not supported")

    def __call__(self, model, x, timesteps, context, **kwargs):
        to = dict(kwargs.pop("transformer_options", None) or {})
        to.pop("optimized_attention_override", None)
        control = kwargs.pop("control", None)
        if control is not None:  # UNetModel pops from these lists: give it its own
            control = {k: list(v) for k, v in control.items()}
        return model(x, timesteps, context, control=control, transformer_options=to, **kwargs)


class DiffusersUNetAdapter(UNetAdapter):
    """diffusers' `UNet2DConditionModel`."""

    family = "diffusers"
    spatial = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")
    refused = ("attention_mask",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("down_blocks", "up_blocks", "conv_in", "conv_out"))

    @staticmethod
    def input_conv(model: nn.Module) -> nn.Module | None:
        return model.conv_in if isinstance(model.conv_in, nn.Conv2d) else None

    def __call__(self, model, x, timesteps, context, **kwargs):
        return model(x, timesteps, encoder_hidden_states=context, return_dict=False, **kwargs)[0]


class ComfyFluxAdapter(UNetAdapter):
    """ComfyUI's Flux transformer (Flux.1 dev and schnell, and models run through that class):
    forward(x, timestep, context, y, guidance, ref_latents, control, transformer_options). Image
    tokens are the 2x2-patchified latent, row-major: a row band is a token range. Rotary position
    ids follow the band through ComfyUI's own rope_options (a row offset), so every token keeps
    its true position; ControlNet residuals (token sequences) are cut to the band's tokens."""

    family = "comfy-flux"
    flow = True
    refused = ("ref_latents", "attention_mask")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("double_blocks", "single_blocks", "img_in", "txt_in", "final_layer",
                                               "patch_size", "process_img"))

    @staticmethod
    def attention_namespace(model: nn.Module):
        module = sys.modules.get(type(model.double_blocks[0]).__module__) if len(model.double_blocks) else None
        if module is None or not callable(getattr(module, "attention", None)):
            raise UnsupportedModelError(f"{type(model).__name__}: its blocks' module has no attention function to "
                                        "split; this transformer is not supported")
        return module

    @staticmethod
    def min_unit(model: nn.Module) -> int:
        return int(model.patch_size)

    @staticmethod
    def output_channels(model: nn.Module) -> int | None:
        return int(model.params.out_channels)  # model.out_channels counts the 2x2 patch channels

    @staticmethod
    def prefix_tokens(context) -> int:
        return int(context.shape[1]) if isinstance(context, torch.Tensor) else 0

    def check(self, kwargs: dict) -> None:
        if kwargs.get("ref_latents") is not None:
            raise UnsupportedInputError("reference latents (Flux Kontext, edit models) attend across the whole "
                                        "reference image and are not split into row bands; run on one device")
        super().check(kwargs)
        to = kwargs.get("transformer_options") or {}
        found = [f"patches.{k}" for k, v in (to.get("patches") or {}).items() if v]
        found += [f"patches_replace.{k}" for k, v in (to.get("patches_replace") or {}).items() if v]
        if found:
            raise UnsupportedInputError(f"model patches {', '.join(sorted(found))} act on whole-image tokens and "
                                        "cannot be split into row bands; remove them or run on one device")

    def cut(self, kwargs: dict, chunk: tuple[int, int], batch: int, rows: tuple[int, int], height: int) -> dict:
        out = super().cut(kwargs, chunk, batch, rows, height)
        patch = self.patch
        to = dict(out.get("transformer_options") or {})
        rope = dict(to.get("rope_options") or {})
        rope["shift_y"] = rope.get("shift_y", 0.0) + rows[0] // patch * rope.get("scale_y", 1.0)
        to["rope_options"] = rope
        out["transformer_options"] = to
        control = out.get("control")
        if control is not None:
            token_rows = (height + patch // 2) // patch
            out["control"] = {k: [None if r is None else _token_rows(r, rows[0] // patch, rows[1] // patch, token_rows)
                                  for r in v] for k, v in control.items()}
        return out

    def bind(self, model: nn.Module) -> UNetAdapter:
        self.patch = int(model.patch_size)
        return self

    def __call__(self, model, x, timesteps, context, **kwargs):
        to = dict(kwargs.pop("transformer_options", None) or {})
        to.pop("optimized_attention_override", None)
        return model(x, timesteps, context, transformer_options=to, **kwargs)


def _token_rows(t: torch.Tensor, start: int, stop: int, token_rows: int) -> torch.Tensor:
    """Tokens of patch rows [start, stop) of a [B, N, C] sequence of `token_rows` rows."""
    per_row = t.shape[1] // token_rows
    return t[:, start * per_row:stop * per_row]


def adapter_for(model: nn.Module) -> UNetAdapter:
    for cls in (ComfyUNetAdapter, DiffusersUNetAdapter, ComfyFluxAdapter):
        if cls.matches(model):
            return cls().bind(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported UNet; supported are ComfyUI's UNetModel (SD1.x, SD2.x, "
        "SDXL) and Flux, and diffusers' UNet2DConditionModel"
    )
