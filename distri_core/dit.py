"""A Flux.1-style diffusion transformer in plain torch, laid out like ComfyUI's Flux class
(img_in, txt_in, double_blocks, single_blocks, final_layer, process_img with rope_options; the
blocks call this module's `attention`), so the engine splits it exactly as it splits ComfyUI's.
With random weights it is the benchmark's Flux on machines without ComfyUI: `DiT(**FLUX_TINY)`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

FLUX_TINY = dict(in_channels=16, hidden_size=128, num_heads=4, axes_dim=(8, 12, 12), depth=2, depth_single_blocks=4,
                 context_in_dim=64, vec_in_dim=64)
# Flux.1's head width (128, rotary axes 16+56+56) and MLP ratio, at a reduced width and depth.
FLUX_SMALL = dict(in_channels=16, hidden_size=512, num_heads=4, axes_dim=(16, 56, 56), depth=2, depth_single_blocks=4,
                  context_in_dim=256, vec_in_dim=128)


def rope(pos: torch.Tensor, dim: int, theta: int = 10000) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    out = torch.einsum("...n,d->...nd", pos.double(), 1.0 / theta ** scale)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor):
    def one(x):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)

    return one(xq), one(xk)


def optimized_attention(q, k, v, heads, skip_reshape=True, mask=None, transformer_options=None):
    """[B, heads, tokens, dim] in, [B, tokens, heads * dim] out (as ComfyUI's with skip_reshape)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def attention(q, k, v, pe, mask=None, transformer_options={}):
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return optimized_attention(q, k, v, q.shape[1], skip_reshape=True, mask=mask, transformer_options=transformer_options)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    t = 1000.0 * t
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Sequential):
    def __init__(self, dim_in: int, hidden: int):
        super().__init__(nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads = heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", nn.Linear(hidden, 6 * hidden))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_qkv", nn.Linear(hidden, 3 * hidden))
            setattr(self, f"{side}_qknorm", QKNorm(hidden // heads))
            setattr(self, f"{side}_proj", nn.Linear(hidden, hidden))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU("tanh"),
                                                       nn.Linear(4 * hidden, hidden)))

    def _qkv(self, side: str, x, mod):
        h = getattr(self, f"{side}_norm1")(x) * (1 + mod[1]) + mod[0]
        qkv = getattr(self, f"{side}_qkv")(h)
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = getattr(self, f"{side}_qknorm")(q, k, v)
        return q, k, v

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        im = self.img_mod(F.silu(vec))[:, None].chunk(6, dim=-1)
        tm = self.txt_mod(F.silu(vec))[:, None].chunk(6, dim=-1)
        iq, ik, iv = self._qkv("img", img, im)
        tq, tk, tv = self._qkv("txt", txt, tm)
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe=pe, mask=attn_mask,
                         transformer_options=transformer_options)
        t_attn, i_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im[2] * self.img_proj(i_attn)
        img = img + im[5] * self.img_mlp(self.img_norm2(img) * (1 + im[4]) + im[3])
        txt = txt + tm[2] * self.txt_proj(t_attn)
        txt = txt + tm[5] * self.txt_mlp(self.txt_norm2(txt) * (1 + tm[4]) + tm[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads, self.hidden = heads, hidden
        self.modulation = nn.Linear(hidden, 3 * hidden)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(hidden, 3 * hidden + 4 * hidden)
        self.linear2 = nn.Linear(hidden + 4 * hidden, hidden)
        self.norm = QKNorm(hidden // heads)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        shift, scale, gate = self.modulation(F.silu(vec))[:, None].chunk(3, dim=-1)
        qkv, mlp = torch.split(self.linear1(self.pre_norm(x) * (1 + scale) + shift), [3 * self.hidden, 4 * self.hidden],
                               dim=-1)
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))


class DiT(nn.Module):
    """forward(x, timestep, context, y=None, guidance=None, control=None, transformer_options={})."""

    def __init__(self, *, in_channels=16, hidden_size=128, num_heads=4, axes_dim=(8, 12, 12), depth=2,
                 depth_single_blocks=4, context_in_dim=64, vec_in_dim=64, patch_size=2, theta=10000):
        super().__init__()
        if sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"axes_dim {axes_dim} must sum to the head width {hidden_size // num_heads}")
        self.patch_size, self.axes_dim, self.theta = patch_size, tuple(axes_dim), theta
        self.params = SimpleNamespace(out_channels=in_channels)
        self.img_in = nn.Linear(in_channels * patch_size ** 2, hidden_size)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.time_in, self.guidance_in = MLPEmbedder(256, hidden_size), MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads) for _ in range(depth_single_blocks))
        self.final_layer = nn.Sequential(nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6),
                                         nn.Linear(hidden_size, patch_size ** 2 * in_channels))

    def process_img(self, x, transformer_options={}):
        b, c, h, w = x.shape
        p = self.patch_size
        img = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        shift = (transformer_options.get("rope_options") or {}).get("shift_y", 0.0)
        ids = torch.zeros(h // p, w // p, 3, device=x.device)
        ids[..., 1] += torch.arange(h // p, device=x.device, dtype=torch.float32)[:, None] + shift
        ids[..., 2] += torch.arange(w // p, device=x.device, dtype=torch.float32)[None]
        return img, ids.reshape(1, -1, 3).expand(b, -1, -1)

    def forward(self, x, timestep, context, y=None, guidance=None, control=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        img, img_ids = self.process_img(x, transformer_options)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timestep).to(img.dtype)) + self.vector_in(y.to(img.dtype))
        if guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        txt = self.txt_in(context)
        ids = torch.cat([torch.zeros(b, txt.shape[1], 3, device=x.device), img_ids], dim=1)
        pe = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3).unsqueeze(1)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, transformer_options=transformer_options)
        x_all = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x_all = block(x_all, vec, pe, transformer_options=transformer_options)
        out = self.final_layer(x_all[:, txt.shape[1]:])
        p = self.patch_size
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
