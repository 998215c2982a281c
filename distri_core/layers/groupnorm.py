"""GroupNorm over a row band with image-wide statistics.

Each band computes its per-group mean and biased variance in float32; the image-wide values are
combined with Chan's parallel formula (exact, and never negative), so `full_sync` and `sync_gn`
equal `nn.GroupNorm`. After warm-up:

- `corrected_async_gn` (paper eq. 2): last step's image-wide E[x] and E[x^2], shifted by this
  band's change since last step (fresh minus stale): the step-to-step drift is mostly global;
  a negative variance estimate falls back to this band's own;
- `stale_gn`: the other bands' last-step statistics combined with this band's fresh ones;
- `separate_gn`: this band's statistics alone.

Both displaced estimates are one weighted sum of every band's stale (E[x], E[x^2]) plus this
band's fresh ones, in a handful of operators on [B, G] tensors; this band's fresh statistics are
written straight into its slot of the stale state, which is what is sent.

Every path normalizes with the native batch-norm inference kernel, fed each channel's group's
image-wide statistics: one pass over x, where the GroupNorm kernel would compute statistics we
already have.

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


def combine_stats(stats: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-wide (mean, biased variance) from per-band [..., 2] (mean, variance) statistics and
    each band's share of the elements (`weights`, [P], summing to 1)."""
    s = torch.stack(stats)  # [P, B, G, 2]
    w = weights.view(-1, *([1] * (s.dim() - 2)))
    means, variances = s[..., 0], s[..., 1]
    mean = (w * means).sum(0)
    var = (w * (variances + (means - mean) ** 2)).sum(0)
    return mean, var


def band_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This band's per-group mean, biased variance and mean of squares, [B, G] float32, from
    float32 sums of x and x^2 (two plain reductions, no copy of half-precision inputs;
    torch.var_mean is 30x slower on a CPU and, for half inputs, returns half-precision results)."""
    xs = x.reshape(x.shape[0], groups, -1)
    n = xs.shape[-1]
    mean = xs.sum(-1, dtype=torch.float32).div_(n)
    second = torch.linalg.vector_norm(xs, dim=-1, dtype=torch.float32).square_().div_(n)
    return mean, torch.addcmul(second, mean, mean, value=-1).clamp_min_(0.0), second


class DistriGroupNorm(DistriLayer):
    """Installed as the forward of an `nn.GroupNorm` (any input [B, C, *]). `feeds` is the
    distributed conv that follows through SiLU (set by the surgery), whose halo it can carry."""

    feeds = None
    extrapolate = False  # its statistics are corrected by this band's drift instead

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.ctx
        mode = ctx.mode.gn_rule if ctx is not None else None
        if ctx is None or not mode.communicates or (mode is Mode.SEPARATE_GN and not ctx.sync):
            return self.original(x, *args, **kwargs)  # this band's statistics alone
        mean_l, var_l, second_l = band_stats(x, self.module.num_groups)
        if ctx.sync and self._can_carry(ctx, x):
            mean_g, var_g = self._global_with_halo(ctx, x, mean_l, var_l)
        elif not ctx.sync and mode in (Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN):
            mean_g, var_g = self._displaced(ctx, mean_l, var_l, second_l)
        else:
            mean_g, var_g = self._global(ctx, mean_l, var_l)
        return self._normalize(x, mean_g, var_g)

    def _normalize(self, x: torch.Tensor, mean_g: torch.Tensor, var_g: torch.Tensor) -> torch.Tensor:
        """x normalized with the image-wide statistics, in one pass over x: the native batch-norm
        inference kernel over (batch, channel) rows, whose running statistics are each channel's
        group's image-wide mean and variance (float32), with the GroupNorm's affine per channel.
        It computes (x - mean) * rsqrt(var + eps) * w + b as the native GroupNorm kernel does, and
        reads x once (the GroupNorm kernel reads it twice, once for statistics we already have)."""
        m = self.module
        b, c = x.shape[:2]
        groups = m.num_groups
        stats = torch.stack([mean_g, var_g])  # [2, B, G]
        if c != groups:
            stats = stats.unsqueeze(-1).expand(2, b, groups, c // groups)
        mean, var = stats.reshape(2, b * c).unbind(0)
        rows = x.reshape(1, b * c, -1)
        if not m.affine:
            return F.batch_norm(rows, mean, var, None, None, False, 0.0, m.eps).view_as(x)
        with self.host.weights(m, x) as (w, bias):  # used inside: a cast copy is released after
            w = w if w.dtype == torch.float32 else w.float()
            bias = bias if bias is None or bias.dtype == torch.float32 else bias.float()
            if b > 1:
                w, bias = w.repeat(b), (None if bias is None else bias.repeat(b))
            return F.batch_norm(rows, mean, var, w, bias, False, 0.0, m.eps).view_as(x)

    def _displaced(self, ctx: CallContext, mean_l: torch.Tensor, var_l: torch.Tensor, second_l: torch.Tensor):
        """A displaced step of `corrected_async_gn` (last step's image-wide mean and mean of
        squares, moved by this band's change since then; a negative variance estimate falls back
        to this band's own) or `stale_gn` (the other bands' last-step statistics with this band's
        fresh ones). Both are one weighted sum of every band's stale moments."""
        corrected = ctx.mode.gn_rule is Mode.CORRECTED_ASYNC_GN
        views, _ = self.exchange(ctx, ((*mean_l.shape, 2), mean_l.dtype))

        def make_weights():
            # corrected: w - e_rank (this band's stale moments are taken out, its fresh ones put
            # in whole); stale: w with this band's own left out, its fresh moments weighted by w_rank.
            weights = ctx.band_weights.clone()
            own = weights[ctx.rank].clone()
            if corrected:  # in place on the device: no host data
                weights[ctx.rank].sub_(1)
            else:
                weights[ctx.rank].zero_()
            return weights.view(-1, 1, 1, 1), own

        weights, own = self.memoized(views, "weights", make_weights)
        moments = torch.stack(list(views))  # [P, B, G, 2]: (mean, variance) ... (a plain list: traceable)
        means, second = moments.unbind(-1)
        second.addcmul_(means, means)  # ... -> (mean, mean of squares)
        fresh = torch.stack([mean_l, second_l], dim=-1)
        est = (weights * moments).sum(0).add_(fresh) if corrected else torch.addcmul((weights * moments).sum(0), own, fresh)
        mean, second = est.unbind(-1)
        var = torch.addcmul(second, mean, mean, value=-1)
        if corrected:
            var = torch.where(var < 0, var_l, var)
        else:
            var = var.clamp_min_(0.0)
        if not self.in_place(ctx, views):
            self.publish(ctx, torch.stack([mean_l, var_l], dim=-1))
        else:  # written straight into this band's slot, which is what is sent
            if torch.compiler.is_compiling():  # a write the compiler joins to the kernel computing it
                views[ctx.rank].copy_(torch.stack([mean_l, var_l], dim=-1))
            else:
                torch.stack([mean_l, var_l], dim=-1, out=views[ctx.rank])
            self.publish(ctx, None)
        return mean, var

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
        raw = conv.edge_rows(x)
        payload = torch.cat([fresh.reshape(-1), raw.reshape(-1) if raw.dtype == torch.float32 else raw.reshape(-1).float()])
        views = ctx.exchanger.gather(self.name + "+halo", payload, None, keep=False)
        n = fresh.numel()
        ctx.exchanger.provide(self.name, torch.stack([v[:n] for v in views]), tuple(fresh.shape))
        keep = ctx.mode.gn_rule in (Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN)
        mean_g, var_g = combine_stats(ctx.exchanger.gather(self.name, fresh, None, keep=keep), ctx.band_weights)
        # Image-wide normalization as a per-(batch, channel) affine, then SiLU, on every band's rows.
        b, c = x.shape[:2]
        per = c // m.num_groups
        scale = torch.rsqrt(var_g + m.eps)[:, :, None].expand(b, m.num_groups, per).reshape(b, c)
        shift = -mean_g[:, :, None].expand(b, m.num_groups, per).reshape(b, c) * scale
        if m.affine:
            with self.host.weights(m, x) as (w, bias):
                w = w if w.dtype == torch.float32 else w.float()
                scale, shift = scale * w, shift * w
                if bias is not None:
                    shift = shift + (bias if bias.dtype == torch.float32 else bias.float())
        rows = torch.stack([v[n:] for v in views]).view(len(views), *raw.shape)
        rows = F.silu(rows * scale[None, :, :, None, None] + shift[None, :, :, None, None])
        slot_dtype = ctx.comm_dtype or x.dtype
        rows = rows if rows.dtype == slot_dtype else rows.to(slot_dtype)
        ctx.exchanger.provide(conv.name, rows.reshape(len(views), -1), tuple(raw.shape))
        return mean_g, var_g

    def _global(self, ctx: CallContext, mean: torch.Tensor, var: torch.Tensor):
        """Synchronous statistics (every sync step; every step of `sync_gn`)."""
        keep = ctx.mode.gn_rule in (Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN)  # the only modes that read them stale
        views = ctx.exchanger.gather(self.name, torch.stack([mean, var], dim=-1), None, keep=keep)
        return combine_stats(views, ctx.band_weights)
