"""Joint attention of a diffusion transformer (ComfyUI's Flux: double- and single-stream blocks)
over a row band: queries of [text tokens | this band's image tokens], keys and values of the text
and of the whole image.

A DiT patchifies the latent row-major, so a row band is a contiguous range of image tokens, and
the image's K/V is every band's K/V in rank order. Text tokens are few: every rank keeps all of
them, fresh. The image K/V of the other bands come from this step (sync) or the previous one
(displaced); this band's are always fresh. K is exchanged after the rotary embedding, which each
band applies with its tokens' true positions.

Installed through a `JointAttentionDispatch` standing in for the `attention` function of the
blocks' module (found by the blocks' module, so this package never imports the host application):
a call goes to the layer whose engine is in a patch-parallel call, else to the host's own function.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .attention import UnsupportedInputError
from .base import DistriLayer, LayerHost


class DistriJointAttention(DistriLayer):
    """attention(q, k, v, pe, mask=None, transformer_options={}) for [B, heads, tokens, dim]."""

    def __init__(self, host: LayerHost, name: str, original: Callable):
        self.module = None
        self.host = host
        self.name = name
        self.original = original
        names = getattr(original, "__globals__", {})
        self.apply_rope = names.get("apply_rope")
        self.attend = names.get("optimized_attention")
        if self.apply_rope is None or self.attend is None:
            raise ValueError(f"{name}: the blocks' attention function does not use apply_rope and optimized_attention "
                             "as ComfyUI's Flux does; this transformer is not supported")

    def __call__(self, q, k, v, pe=None, mask=None, transformer_options={}):
        ctx = self.ctx
        if ctx is None:
            return self.original(q, k, v, pe=pe, mask=mask, transformer_options=transformer_options)
        if mask is not None:
            raise UnsupportedInputError(f"{self.name}: an attention mask spans the whole image and cannot be split "
                                        "into row bands; remove it or run on one device")
        if pe is not None:
            q, k = self.apply_rope(q, k, pe)
        if ctx.mode.communicates:
            n = ctx.prefix_tokens
            own = torch.stack([k[:, :, n:], v[:, :, n:]])  # [2, B, heads, band tokens, dim]
            fresh = own if ctx.comm_dtype is None else own.to(ctx.comm_dtype)
            views, _ = self.exchange(ctx, fresh, scaled_dim=3)
            parts = [t.to(k.dtype) for t in views]
            parts[ctx.rank] = own
            image = torch.cat(parts, dim=3)
            self.publish(ctx, fresh)
            k = torch.cat([k[:, :, :n], image[0]], dim=2)
            v = torch.cat([v[:, :, :n], image[1]], dim=2)
        return self.attend(q, k, v, q.shape[1], skip_reshape=True, transformer_options=transformer_options)

    def __repr__(self) -> str:
        return f"DistriJointAttention({self.name})"


class JointAttentionDispatch:
    """Stands in for a transformer module's `attention` function, once per process: routes each call
    to the patch-parallel layer whose engine is inside a call, else to the module's own function.
    Engines register and unregister their layers; a layer whose engine is gone drops out (weak)."""

    def __init__(self, original: Callable):
        self.original = original
        self.layers: weakref.WeakSet[DistriJointAttention] = weakref.WeakSet()

    def __call__(self, q, k, v, pe=None, mask=None, transformer_options={}):
        for layer in list(self.layers):
            if layer.ctx is not None:
                return layer(q, k, v, pe=pe, mask=mask, transformer_options=transformer_options)
        return self.original(q, k, v, pe=pe, mask=mask, transformer_options=transformer_options)


def install_joint_attention(namespace, host: LayerHost, name: str) -> tuple[DistriJointAttention, Callable[[], None]]:
    """Register a layer for `host` on `namespace.attention` (a dispatch, installed the first time);
    returns the layer and its undo."""
    current = namespace.attention
    dispatch = current if isinstance(current, JointAttentionDispatch) else JointAttentionDispatch(current)
    namespace.attention = dispatch
    layer = DistriJointAttention(host, name, dispatch.original)
    dispatch.layers.add(layer)

    def undo() -> None:
        dispatch.layers.discard(layer)
        if not dispatch.layers and namespace.attention is dispatch:
            namespace.attention = dispatch.original

    return layer, undo
