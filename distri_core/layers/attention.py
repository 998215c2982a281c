"""Self-attention over a row band: queries of this band, keys and values of the whole image.

A row band is a contiguous range of tokens (both UNet families flatten row-major), so the image's
K/V is the concatenation of every band's K/V in rank order. This band's K/V are always fresh;
the other bands' come from this step (sync) or the previous step (DistriFusion).

Two front-ends share `DistriKV`: `DistriSelfAttention`, installed as the forward of ComfyUI's
`CrossAttention` used as `attn1`, and `DistriAttnProcessor`, a diffusers attention processor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import CallContext, DistriLayer, LayerHost


class UnsupportedInputError(ValueError):
    """An input the patch-parallel UNet cannot split correctly."""


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    scale: float | None = None, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v over `heads` heads, for [B, N, heads * d] tensors."""
    b, nq, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, nq, inner).to(dtype)


class DistriKV(DistriLayer):
    """Image-wide K and V for this band's queries."""

    def full_kv(self, ctx: CallContext, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not ctx.sync and (ctx.comm_dtype is None or ctx.comm_dtype == k.dtype):
            # A displaced step: the exchange needs only the shape of [K; V] to hand out the stale views.
            views, _ = self.exchange(ctx, ((2, *k.shape), k.dtype), scaled_dim=2)
            if self.in_place(ctx, views):
                return self._kv_in_place(ctx, views, k, v)
            fresh = torch.stack([k, v])
        else:
            fresh = torch.stack([k, v])  # [2, B, N, C]
            if ctx.comm_dtype is not None and ctx.comm_dtype != fresh.dtype:
                fresh = fresh.to(ctx.comm_dtype)
            views, _ = self.exchange(ctx, fresh, scaled_dim=2)
        parts = [t if t.dtype == k.dtype else t.to(k.dtype) for t in views]
        parts[ctx.rank] = fresh if fresh.dtype == k.dtype else torch.stack([k, v])  # this band's, exact
        kv = torch.cat(parts, dim=2)
        self.publish(ctx, fresh)
        return kv[0], kv[1]

    def _kv_in_place(self, ctx: CallContext, views: list[torch.Tensor], k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Displaced step with views that stay put: this band's K and V are written straight into
        its own slot (which is what gets sent), and the image's K and V are one cat each of every
        band's slot: two copies and two cats, where stacking, casting and publishing took more."""
        ks, vs = self.memoized(views, "kv", lambda: ([t[0] for t in views], [t[1] for t in views]))
        ks[ctx.rank].copy_(k)
        vs[ctx.rank].copy_(v)
        full_k, full_v = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        # The cats were issued before the publish that may launch this bucket's gather (which
        # overwrites the other bands' slots): on a GPU the gather's stream waits for them.
        self.publish(ctx, None)
        return full_k, full_v


def module_attention(module: torch.nn.Module) -> Callable | None:
    """The attention function the module's own forward calls: ComfyUI's module-global
    `optimized_attention`, chosen at import for the device and flags (pytorch SDPA, sage, flash,
    xformers, split...), looked up at call time. Calling it keeps ComfyUI's precision rules
    (`attn_precision`: SD2.x upcasts only where ComfyUI's kernel does) and its fast kernel."""
    fn = getattr(sys.modules.get(type(module).__module__), "optimized_attention", None)
    return fn if callable(fn) else None


class DistriSelfAttention(DistriKV):
    """Forward of ComfyUI's `CrossAttention` in self-attention use (attn1)."""

    def __call__(self, x: torch.Tensor, context=None, value=None, mask=None, transformer_options={}):
        ctx = self.ctx
        if ctx is None:
            return self.original(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        if mask is not None:
            raise UnsupportedInputError(f"{self.name}: a self-attention mask spans the whole image and "
                                        "cannot be split into row bands; remove the mask or run on one device")
        if context is not None or value is not None:
            raise UnsupportedInputError(f"{self.name}: self-attention received a context/value from an attention "
                                        "patch (attn1_patch); such patches cannot be split into row bands")
        m = self.module
        q, k, v = m.to_q(x), m.to_k(x), m.to_v(x)
        if ctx.mode.communicates:
            k, v = self.full_kv(ctx, k, v)
        precision = getattr(m, "attn_precision", None)
        attend = module_attention(m)
        if attend is not None:
            out = attend(q, k, v, m.heads, attn_precision=precision, transformer_options=transformer_options)
        else:
            out = attention_heads(q, k, v, m.heads, upcast=precision == torch.float32)
        return m.to_out(out)


class DistriAttnProcessor(DistriKV):
    """A diffusers attention processor for self-attention (`attn1`, mid-block attention)."""

    def __init__(self, module: torch.nn.Module, host: LayerHost, name: str, fallback: Callable):
        super().__init__(module, host, name)
        self.original = fallback  # the processor it replaces, used when no split is active

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        ctx = self.ctx
        if ctx is None or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise UnsupportedInputError(f"{self.name}: a self-attention mask cannot be split into row bands")
        if getattr(attn, "spatial_norm", None) is not None:
            raise UnsupportedInputError(f"{self.name}: attention with spatial_norm is not supported")
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        d = k.shape[-1] // heads
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q.unflatten(-1, (heads, d))).flatten(-2)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k.unflatten(-1, (heads, d))).flatten(-2)
        if ctx.mode.communicates:
            k, v = self.full_kv(ctx, k, v)
        out = attention_heads(q, k, v, heads)  # as diffusers' AttnProcessor2_0
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
