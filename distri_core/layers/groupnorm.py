"""GroupNorm over a row band with image-wide statistics.

Each band computes its per-group mean and biased variance in float32; the image-wide values are
combined with Chan's parallel formula (exact, and never negative), so `full_sync` and `sync_gn`
equal `nn.GroupNorm`. After warm-up:

- `corrected_async_gn` (paper eq. 2): last step's image-wide E[x] and E[x^2], shifted by this
  band's change since last step (fresh minus stale): the step-to-step drift is mostly global;
  a negative variance estimate falls back to this band's own;
- `stale_gn`: the other bands' last-step statistics combined with this band's fresh ones;
- `separate_gn`: this band's statistics alone.

The hot path never waits for the device: no float64, no host data copied to the device per call
(the band weights are a device tensor made once per layout), no device value read back.

When a convolution follows through SiLU only (a ResBlock half: GroupNorm, SiLU, [Dropout],
Conv3x3), a synchronous step sends the statistics and this band's edge rows of the GroupNorm's
input in one exchange; every rank then applies the image-wide normalization and SiLU to its
neighbours' rows itself and hands them to the convolution, which sends nothing: one blocking
exchange per ResBlock half instead of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Mode
from .base import CallContext, DistriLayer
from .conv import halo_slot


def combine_stats(stats: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-wide (mean, biased variance) from per-band [..., 2] (mean, variance) statistics and
    each band's share of the elements (`weights`, [P], summing to 1)."""
    s = torch.stack(stats)  # [P, B, G, 2]
    w = weights.view(-1, *([1] * (s.dim() - 2)))
    means, variances = s[..., 0], s[..., 1]
    mean = (w * means).sum(0)
    var = (w * (variances + (means - mean) ** 2)).sum(0)
    return mean, var


def corrected_stats(stale: list[torch.Tensor], weights: torch.Tensor, rank: int, fresh: torch.Tensor):
    """DistriFusion's corrected estimate: E_t ~ E_{t+1} (image) + E_t (band) - E_{t+1} (band)."""
    old_mean, old_var = combine_stats(stale, weights)
    s_old, s_new = stale[rank], fresh
    mean = old_mean + s_new[..., 0] - s_old[..., 0]
    second = (old_var + old_mean ** 2) + (s_new[..., 1] + s_new[..., 0] ** 2) - (s_old[..., 1] + s_old[..., 0] ** 2)
    var = second - mean ** 2
    return mean, torch.where(var < 0, s_new[..., 1], var)


def band_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This band's per-group mean and biased variance, [B, G] float32, from float32 sums of x and
    x^2 (two plain reductions, no copy of half-precision inputs; torch.var_mean is 30x slower on
    a CPU and, for half inputs, returns half-precision results)."""
    xs = x.reshape(x.shape[0], groups, -1)
    n = xs.shape[-1]
    mean = xs.sum(-1, dtype=torch.float32) / n
    second = torch.linalg.vector_norm(xs, dim=-1, dtype=torch.float32).square() / n
    return mean, (second - mean.square()).clamp_min(0.0)


class DistriGroupNorm(DistriLayer):
    """Installed as the forward of an `nn.GroupNorm` (any input [B, C, *]). `feeds` is the
    distributed conv that follows through SiLU (set by the surgery), whose halo it can carry."""

    feeds = None

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.ctx
        mode = ctx.mode if ctx is not None else None
        if ctx is None or not mode.communicates or (mode is Mode.SEPARATE_GN and not ctx.sync):
            return self.original(x, *args, **kwargs)  # this band's statistics alone
        m = self.module
        b, c = x.shape[:2]
        groups, per = m.num_groups, c // m.num_groups
        mean_l, var_l = band_stats(x, groups)
        if ctx.sync and self._can_carry(ctx, x):
            mean_g, var_g = self._global_with_halo(ctx, x, mean_l, var_l)
        else:
            mean_g, var_g = self._global(ctx, mean_l, var_l)
        # The native kernel normalizes with this band's statistics (and rounds once); a per-(batch,
        # channel) affine turns that into normalization with the image-wide ones:
        #   (x - mg) * rg * w + b = ((x - ml) * rl) * (w * rg / rl) + (b + w * (ml - mg) * rg)
        rstd_l = torch.rsqrt(var_l + m.eps)
        rstd_g = torch.rsqrt(var_g + m.eps)
        scale = (rstd_g / rstd_l)[:, :, None].expand(b, groups, per).reshape(b, c)
        shift = ((mean_l - mean_g) * rstd_g)[:, :, None].expand(b, groups, per).reshape(b, c)
        if m.affine:
            with self.host.weights(m, x) as (w, bias):
                w = w.float()
                scale, shift = scale * w, shift * w
                if bias is not None:
                    shift = shift + bias.float()
        flat = x.reshape(1, b * c, *x.shape[2:])
        out = F.group_norm(flat, b * groups, scale.reshape(-1).to(x.dtype), shift.reshape(-1).to(x.dtype), m.eps)
        return out.view_as(x)

    def _can_carry(self, ctx: CallContext, x: torch.Tensor) -> bool:
        """The next conv's halo can travel with the statistics: a 4-D input and every band at
        least as tall as the halo (no zero-filled slot rows, which SiLU would not keep zero)."""
        conv = self.feeds
        if conv is None or x.dim() != 4:
            return False
        return all(ctx.bands.scaled(j, x.shape[2], ctx.rank) >= conv.halo for j in range(ctx.bands.parts))

    def _global_with_halo(self, ctx: CallContext, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        """One exchange for [statistics | edge rows of x]; the statistics go on as this layer's own
        exchange, the neighbours' rows (normalized and activated here) as the conv's."""
        m, conv = self.module, self.feeds
        fresh = torch.stack([mean, var], dim=-1)
        raw = halo_slot(x, conv.halo)
        payload = torch.cat([fresh.reshape(-1), raw.reshape(-1).float()])
        views = ctx.exchanger.gather(self.name + "+halo", payload, None, keep=False)
        n = fresh.numel()
        ctx.exchanger.provide(self.name, torch.stack([v[:n] for v in views]), tuple(fresh.shape))
        keep = ctx.mode in (Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN)
        mean_g, var_g = combine_stats(ctx.exchanger.gather(self.name, fresh, None, keep=keep), ctx.band_weights)
        # Image-wide normalization as a per-(batch, channel) affine, then SiLU, on every band's rows.
        b, c = x.shape[:2]
        per = c // m.num_groups
        scale = torch.rsqrt(var_g + m.eps)[:, :, None].expand(b, m.num_groups, per).reshape(b, c)
        shift = -mean_g[:, :, None].expand(b, m.num_groups, per).reshape(b, c) * scale
        if m.affine:
            with self.host.weights(m, x) as (w, bias):
                scale, shift = scale * w.float(), shift * w.float()
                if bias is not None:
                    shift = shift + bias.float()
        rows = torch.stack([v[n:] for v in views]).view(len(views), *raw.shape)
        rows = F.silu(rows * scale[None, :, :, None, None] + shift[None, :, :, None, None])
        slot_dtype = ctx.comm_dtype or x.dtype
        ctx.exchanger.provide(conv.name, rows.to(slot_dtype).reshape(len(views), -1), tuple(raw.shape))
        return mean_g, var_g

    def _global(self, ctx: CallContext, mean: torch.Tensor, var: torch.Tensor):
        mode = ctx.mode
        fresh = torch.stack([mean, var], dim=-1)
        weights = ctx.band_weights
        if ctx.sync or mode is Mode.SYNC_GN:
            keep = mode in (Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN)  # the only modes that read them stale
            views = ctx.exchanger.gather(self.name, fresh, None, keep=keep)
            return combine_stats(views, weights)
        views, _ = self.exchange(ctx, fresh)
        if mode is Mode.CORRECTED_ASYNC_GN:
            result = corrected_stats(views, weights, ctx.rank, fresh)
        else:
            stats = list(views)
            stats[ctx.rank] = fresh
            result = combine_stats(stats, weights)
        self.publish(ctx, fresh)
        return result
