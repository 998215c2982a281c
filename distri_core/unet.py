"""A Stable Diffusion UNet in plain torch, laid out like ComfyUI's UNetModel (input_blocks,
middle_block, output_blocks, out; the same forward signature), so the engine treats it exactly
as it treats ComfyUI's. With random weights it is the built-in model of the GPU check, the
benchmark and the doctor on machines with neither ComfyUI nor diffusers: `UNet(**SDXL)` has
SDXL's 2.6B-parameter shape, `UNet(**SD15)` SD1.5's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers.attention import attention_heads

SD15 = dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, transformer_depth=(1, 1, 1, 0),
            middle_depth=1, context_dim=768, num_heads=8, linear_projection=False)
SDXL = dict(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 10),
            middle_depth=10, context_dim=2048, num_head_channels=64, adm_in_channels=2816, linear_projection=True)
TINY = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
            middle_depth=1, context_dim=32, num_head_channels=16, adm_in_channels=64, linear_projection=True)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_dim: int, out_ch: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = tuple(output_shape[2:]) if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.attn_precision = None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        context = x if context is None else context
        return self.to_out(attention_heads(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim * 8)
        self.out = nn.Linear(dim * 4, dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    disable_self_attn = False

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, transformer_options={}):
        x = self.attn1(self.norm1(x), transformer_options=transformer_options) + x
        x = self.attn2(self.norm2(x), context=context, transformer_options=transformer_options) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(ch, heads, dim_head, context_dim)
                                                for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context, transformer_options={}):
        b, c, h, w = x.shape
        x_in, x = x, self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.movedim(1, 3).reshape(b, h * w, c)  # row-major tokens: a row band is a token range
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, transformer_options)
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).movedim(3, 1)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


class Sequence(nn.Sequential):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape)
            else:
                x = layer(x)
        return x


def _control(h, control, name):
    if control is not None and control.get(name):
        residual = control[name].pop()
        if residual is not None:
            h = h + residual
    return h


class UNet(nn.Module):
    """forward(x, timesteps, context, y=None, control=None, transformer_options={}) like ComfyUI's
    UNetModel; `control` residuals are popped from the end of each list, as ComfyUI does."""

    def __init__(self, *, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult=(1, 2, 4), num_res_blocks: int = 2, transformer_depth=(0, 2, 10), middle_depth: int = 1,
                 context_dim: int = 768, num_heads: int | None = None, num_head_channels: int | None = None,
                 adm_in_channels: int | None = None, linear_projection: bool = True):
        super().__init__()
        self.model_channels, self.out_channels = model_channels, out_channels
        emb_dim = model_channels * 4

        def transformer(ch, depth):
            heads = num_heads or ch // num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, depth, context_dim, linear_projection)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = None
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([Sequence(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skips, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * model_channels)]
                ch = mult * model_channels
                if transformer_depth[level]:
                    layers.append(transformer(ch, transformer_depth[level]))
                self.input_blocks.append(Sequence(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Sequence(Downsample(ch)))
                skips.append(ch)
        self.middle_block = Sequence(ResBlock(ch, emb_dim, ch), transformer(ch, middle_depth), ResBlock(ch, emb_dim, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mult * model_channels)]
                ch = mult * model_channels
                if transformer_depth[level]:
                    layers.append(transformer(ch, transformer_depth[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Sequence(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, transformer_options)
            h = _control(h, control, "input")
            hs.append(h)
        h = _control(self.middle_block(h, emb, context, transformer_options), control, "middle")
        for block in self.output_blocks:
            skip = _control(hs.pop(), control, "output")
            h = block(torch.cat([h, skip], dim=1), emb, context, transformer_options,
                      hs[-1].shape if hs else None)
        return self.out(h)
