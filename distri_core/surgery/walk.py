"""Install distributed layers on a model by walking its module tree by type.

Modules keep their type, names and parameters: a distributed layer is installed as the
instance's `forward` (or, for diffusers attention, as its processor, the library's own
extension point) and `Installed.undo()` restores the model exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.attention import DistriAttnProcessor, DistriSelfAttention
from ..layers.base import LayerHost
from ..layers.conv import DistriConv2d, conv_halo
from ..layers.groupnorm import DistriGroupNorm
from ..layers.joint_attention import install_joint_attention


class UnsupportedModelError(ValueError):
    """The model (or a module in it) cannot be split into row bands."""


# Modules whose row split this package does not implement; finding one refuses the model.
_REFUSED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
            nn.MultiheadAttention, nn.BatchNorm2d, nn.InstanceNorm2d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveMaxPool2d)


@dataclass
class Installed:
    """What `install_layers` changed, and what the runtime needs to know about the model."""

    host: LayerHost
    unit: int  # a band must span a multiple of this many input rows
    input_halo: int = 0  # rows of the input latent the input convolution reads beyond a band
    layers: list = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.layers.clear()


def _is_diffusers_attention(m: nn.Module) -> bool:
    return hasattr(m, "set_processor") and hasattr(m, "processor") and hasattr(m, "is_cross_attention")


def _is_comfy_transformer_block(m: nn.Module) -> bool:
    return hasattr(m, "attn1") and hasattr(m, "disable_self_attn") and hasattr(m.attn1, "to_q")


def _set_forward(installed: Installed, module: nn.Module, layer) -> None:
    module.forward = layer
    installed.layers.append(layer)
    installed._undo.append(lambda: module.__dict__.pop("forward", None))


def _set_processor(installed: Installed, module: nn.Module, layer, old) -> None:
    module.set_processor(layer)
    installed.layers.append(layer)
    installed._undo.append(lambda: module.set_processor(old))


def downsample_unit(model: nn.Module) -> int:
    """2 ** (number of stride-2 downsamplers): band heights must be multiples of this."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            stride = m.stride[0]
        elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            stride = m.stride if isinstance(m.stride, int) else m.stride[0]
        else:
            continue
        if stride == 2:
            count += 1
        elif stride != 1:
            raise UnsupportedModelError(f"{type(m).__name__} with stride {stride} cannot be split into row bands")
    return 2 ** count


def install_layers(model: nn.Module, host: LayerHost, input_conv: nn.Module | None = None,
                   attention_namespace=None) -> Installed:
    """Make every spatially global layer of `model` band-aware. Raises UnsupportedModelError,
    leaving the model untouched, when a module cannot be split. `input_conv`, the convolution of
    the model's input latent, takes its halo from that input (CallContext.input_halo) instead of
    an exchange. `attention_namespace`, the module whose `attention` function a DiT's blocks call,
    gets a DistriJointAttention there (undone with the rest)."""
    for name, m in model.named_modules():
        if isinstance(m, _REFUSED):
            raise UnsupportedModelError(
                f"{name} is a {type(m).__name__}, which this package cannot split into row bands; "
                "only SD1.x/SD2.x/SDXL-style 2D UNets are supported"
            )
        if "forward" in m.__dict__:
            raise UnsupportedModelError(f"{name or 'the model'} already has a patched forward (layers "
                                        "installed twice, or another tool's patch); use a fresh model")
    installed = Installed(host, downsample_unit(model))
    try:
        if attention_namespace is not None:
            joint, undo = install_joint_attention(attention_namespace, host, "joint_attn")
            installed.layers.append(joint)
            installed._undo.append(undo)
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and conv_halo(m) > 0:
                from_input = m is input_conv and m.stride[0] == 1
                if from_input:
                    installed.input_halo = conv_halo(m)
                _set_forward(installed, m, DistriConv2d(m, host, name, from_input=from_input))
            elif isinstance(m, nn.GroupNorm):
                _set_forward(installed, m, DistriGroupNorm(m, host, name))
            elif _is_diffusers_attention(m) and not m.is_cross_attention:
                old = m.processor
                _set_processor(installed, m, DistriAttnProcessor(m, host, name, old), old)
            elif _is_comfy_transformer_block(m) and not m.disable_self_attn:
                _set_forward(installed, m.attn1, DistriSelfAttention(m.attn1, host, name + ".attn1"))
    except ValueError as e:
        installed.undo()
        if isinstance(e, UnsupportedModelError):
            raise
        raise UnsupportedModelError(str(e)) from e
    _pair_norm_and_conv(model)
    return installed


def _pair_norm_and_conv(model: nn.Module) -> None:
    """GroupNorm, SiLU, [Dropout in eval], Conv: a ResBlock half (an nn.Sequential in ComfyUI's
    and the built-in UNet; norm1/conv1 and norm2/conv2 of a diffusers ResnetBlock2D without
    up/downsampling): the norm carries the conv's halo in synchronous steps."""
    for block in model.modules():
        if all(hasattr(block, a) for a in ("norm1", "conv1", "norm2", "conv2", "nonlinearity")) \
                and getattr(block, "upsample", None) is None and getattr(block, "downsample", None) is None \
                and isinstance(block.nonlinearity, nn.SiLU) and not block.training:
            for norm, conv in ((block.norm1, block.conv1), (block.norm2, block.conv2)):
                _pair(norm.__dict__.get("forward"), conv.__dict__.get("forward"))
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        parts = list(seq)
        for i, m in enumerate(parts[:-2]):
            layer = m.__dict__.get("forward")
            if not isinstance(layer, DistriGroupNorm) or not isinstance(parts[i + 1], nn.SiLU):
                continue
            j = i + 2
            while j < len(parts) and isinstance(parts[j], (nn.Dropout, nn.Identity)) and not parts[j].training:
                j += 1
            _pair(layer, parts[j].__dict__.get("forward") if j < len(parts) else None)


def _pair(norm, conv) -> None:
    if isinstance(norm, DistriGroupNorm) and isinstance(conv, DistriConv2d) and conv.stride_h == 1 \
            and not conv.from_input:
        norm.feeds = conv

def slice_rows(t: torch.Tensor, start: int, stop: int, height: int) -> torch.Tensor:
    """Rows of a [.., h, w] tensor that belong to latent rows [start, stop) of a `height`-row
    latent (h may be the latent's height or a downsampled one)."""
    h = t.shape[-2]
    if h == height:
        return t[..., start:stop, :]
    if height % h or start % (height // h) or stop % (height // h):
        raise ValueError(f"a conditioning tensor of height {h} does not align with row band [{start}, {stop}) "
                         f"of a {height}-row latent")
    f = height // h
    return t[..., start // f:stop // f, :]
