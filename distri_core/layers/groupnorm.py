"""GroupNorm over a row band with image-wide statistics.

Each band computes its per-group mean and mean of squares in float32 ([2, B, G], what is
exchanged); the image-wide mean and variance are combined from every band's mean and variance with
Chan's parallel formula (exact, and never negative), so `full_sync` and `sync_gn` equal
`nn.GroupNorm` (but for groups whose |mean| is some 100 times their standard deviation or more,
whose band variance float32 rounding eats: docs/benchmarks.md). After warm-up:

- `corrected_async_gn` (paper eq. 2): last step's image-wide E[x] and E[x^2], shifted by this
  band's change since last step (fresh minus stale): the step-to-step drift is mostly global;
  a negative variance estimate falls back to this band's own;
- `stale_gn`: the other bands' last-step statistics combined with this band's fresh ones;
- `separate_gn`: this band's statistics alone.

Both displaced estimates are one weighted sum of every band's stale (E[x], E[x^2]) plus this
band's fresh ones: in eager calls one matrix product over a view of the stale state, into buffers
kept per stale key (16 operators a layer for `corrected_async_gn`); this band's fresh moments are
written straight into its slot of the stale state, which is what is sent. Synchronous statistics
(every synchronous step, every step of `sync_gn`) likewise fill buffers the layer keeps per input
shape: Chan's formula as two matrix products with the band weights (on builtin tiny 27
operators a layer, 40 where the conv's halo travels along, against 37 and 72 as separate
tensors).

Every path normalizes with the native batch-norm inference kernel, fed each channel's group's
image-wide statistics: one pass over x, where the GroupNorm kernel would compute statistics we
already have.

The hot path never waits for the device: no float64, no host data copied to the device per call
(the band weights are a device tensor made once per layout), no device value read back.

When a convolution follows through SiLU only (a ResBlock half: GroupNorm, SiLU, [Dropout],
Conv3x3), a synchronous step sends the statistics and this band's edge rows of the GroupNorm's
input in one exchange; every rank then applies the image-wide normalization and SiLU to its
neighbours' rows itself, with the same batch-norm kernel their own band uses, and hands them to
the convolution, which sends nothing: one blocking exchange per ResBlock half instead of two.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..config import Mode
from .base import CallContext, DistriLayer

# The GroupNorm rules whose displaced steps read last step's statistics (so their synchronous
# steps keep what they gather as stale state).
STALE_RULES = (Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN)


def combine_stats(rows: torch.Tensor, weights: torch.Tensor,
                  into: _SyncStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-wide (mean, biased variance), [1, B·G] each, from every band's (mean, mean of squares)
    as [P, 2·B·G] rows and each band's share of the elements (`weights`, a [1, P] row summing to 1):
    each band's variance (never negative), then Chan's parallel formula as two products with the
    weights. With `into`, every result goes into its buffers (no allocation; the same bits)."""
    half = rows.shape[1] // 2
    means, second = rows[:, :half], rows[:, half:]
    variances = torch.addcmul(second, means, means, value=-1, out=into and into.variances).clamp_min_(0.0)
    mean = torch.mm(weights, means, out=into and into.mean_row)
    dev = torch.sub(means, mean, out=into and into.dev)
    var = torch.mm(weights, variances.addcmul_(dev, dev), out=into and into.var_row)
    return mean, var


def rows_of(views: list[torch.Tensor]) -> torch.Tensor | None:
    """Every band's tensor as one [P, numel] view, where they sit at a fixed stride in one storage
    (the stale state of one bucket, and every gather's result: always, for tensors of one shape);
    else None."""
    first = views[0]
    if not all(v.is_contiguous() and v.shape == first.shape and v.untyped_storage().data_ptr()
               == first.untyped_storage().data_ptr() for v in views):
        return None
    stride = views[1].storage_offset() - first.storage_offset() if len(views) > 1 else first.numel()
    if any(v.storage_offset() != first.storage_offset() + j * stride for j, v in enumerate(views)):
        return None
    return first.as_strided((len(views), first.numel()), (stride, 1))


def inverse_count(x: torch.Tensor, groups: int) -> float:
    """1 / the elements of one group in this band."""
    return groups / x[0].numel()


def group_sums(x: torch.Tensor, groups: int, total: torch.Tensor | None = None,
               squares: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 sums of x and of x^2 per group, [B, G] each (into `total` and `squares` where
    given): two plain reductions, no copy of half-precision inputs (torch.var_mean is 40x slower
    on a CPU and, for half inputs, returns half-precision results)."""
    xs = x.reshape(x.shape[0], groups, -1)
    return (torch.sum(xs, -1, dtype=torch.float32, out=total),
            torch.linalg.vector_norm(xs, dim=-1, dtype=torch.float32, out=squares).square_())


def band_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """This band's per-group (mean, mean of squares), [2, B, G] float32 (what the bands exchange).
    `_Buffers.fill` computes the same bits into its buffers."""
    return torch.stack(group_sums(x, groups)).mul_(inverse_count(x, groups))


class _Buffers:
    """What a GroupNorm fills instead of allocating, per input shape: this band's moments
    (`fresh`, [2, B, G]), the image-wide estimate (`est`: mean, then variance) and each channel's
    copy of its group's statistics (`mean_c`, `var_c`, [B C], what the batch-norm kernel takes)."""

    def __init__(self, x: torch.Tensor, groups: int):
        b, c = x.shape[:2]
        self.key = (tuple(x.shape), x.device)
        self.inv_n = inverse_count(x, groups)
        f32 = dict(dtype=torch.float32, device=x.device)
        self.fresh = torch.empty(2, b, groups, **f32)  # this band's (mean, mean of squares)
        self.fresh_row = self.fresh.view(1, -1)
        self.mean_l, self.second_l = self.fresh.unbind(0)
        self.est = torch.empty(2, b, groups, **f32)  # image-wide (mean, mean of squares), then (mean, variance)
        self.est_row = self.est.view(1, -1)
        self.mean_g, self.var_g = self.est.unbind(0)
        self.mean_row, self.var_row = self.est.view(2, 1, -1).unbind(0)
        if c == groups:
            self.spread = None
            self.mean_c, self.var_c = self.est.view(2, b * c).unbind(0)
        else:  # each channel gets its group's statistics: one copy of a broadcast view
            per = c // groups
            channel = torch.empty(2, b * c, **f32)
            self.spread = (channel.view(2, b * groups, per), self.est.view(2, b * groups, 1).expand(2, b * groups, per))
            self.mean_c, self.var_c = channel.unbind(0)

    def fill(self, x: torch.Tensor) -> None:
        """`band_moments(x)` into `fresh`: the same bits."""
        group_sums(x, self.fresh.shape[2], self.mean_l, self.second_l)
        self.fresh.mul_(self.inv_n)

    def spread_(self) -> None:
        """`est` to each channel (`mean_c`, `var_c`)."""
        if self.spread is not None:
            self.spread[0].copy_(self.spread[1])


class _Lean(_Buffers):
    """What a displaced step of one GroupNorm reuses from call to call, made once per stale key
    (kept in its views' memo): every band's stale moments as one [P, 2 B G] view, the weights of
    the rule as a [1, P] row, and the buffers. A call then fills them with out= and in-place
    operators: 16 for `corrected_async_gn` (29 before, as separate tensors), none of them a
    stack, a cast or a view of the stale state."""

    def __init__(self, rows: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, groups: int, corrected: bool):
        super().__init__(x, groups)
        self.rows, self.weights, self.corrected = rows, weights, corrected
        self.var_l = torch.empty_like(self.mean_l) if corrected else None


class _SyncStats(_Buffers):
    """A synchronous GroupNorm's buffers (per layer, for the last input shape and band count): the
    weights' [1, P] row, and every band's variance and deviation from the image-wide mean for
    Chan's formula, which then takes 7 operators (`combine`), none of them an allocation."""

    def __init__(self, x: torch.Tensor, groups: int, band_weights: torch.Tensor):
        super().__init__(x, groups)
        parts = band_weights.numel()
        self.key = (*self.key, parts)
        self.band_weights, self.weights = band_weights, band_weights.view(1, -1)
        self.variances = torch.empty(parts, self.fresh_row.shape[1] // 2, dtype=torch.float32, device=x.device)
        self.dev = torch.empty_like(self.variances)

    def combine(self, rows: torch.Tensor) -> None:
        """`combine_stats(rows, weights)` into `est` and each channel's statistics."""
        combine_stats(rows, self.weights, self)
        self.spread_()


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
        if not ctx.sync and mode in STALE_RULES:
            return self._displaced(ctx, x)
        buffers = self._sync_stats(ctx, x) if self._lean(ctx) else None
        if ctx.sync and self._can_carry(ctx, x):
            return self._global_with_halo(ctx, x, buffers)
        return self._global(ctx, x, buffers)

    @staticmethod
    def _lean(ctx: CallContext) -> bool:
        """Synchronous statistics go into the layer's `_SyncStats` (eager calls). Under compile,
        and where layers hand over copies (`cuda_graphs`), the same arithmetic runs on separate
        tensors, with the same bits (see `_global`)."""
        return ctx.write_in_place and not torch.compiler.is_compiling()

    def _sync_stats(self, ctx: CallContext, x: torch.Tensor) -> _SyncStats:
        """This layer's synchronous buffers, made anew when the input shape, device or band count
        changes; the weights row follows the context's (one per layout)."""
        buffers = getattr(self, "_sync", None)
        if buffers is None or buffers.key != (tuple(x.shape), x.device, ctx.band_weights.numel()):
            buffers = self._sync = _SyncStats(x, self.module.num_groups, ctx.band_weights)
        elif buffers.band_weights is not ctx.band_weights:
            buffers.band_weights, buffers.weights = ctx.band_weights, ctx.band_weights.view(1, -1)
        return buffers

    def _normalize(self, x: torch.Tensor, mean_g: torch.Tensor, var_g: torch.Tensor) -> torch.Tensor:
        """x normalized with the image-wide statistics ([B, G] or [1, B·G] each), in one pass over
        x (see `_apply`)."""
        return self._apply(x, *self._channels(x, mean_g, var_g))

    def _channels(self, x: torch.Tensor, mean_g: torch.Tensor, var_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each channel's copy of its group's statistics, [B C] each."""
        b, c = x.shape[:2]
        groups = self.module.num_groups
        stats = torch.stack([mean_g, var_g]).view(2, b, groups)
        if c != groups:
            stats = stats.unsqueeze(-1).expand(2, b, groups, c // groups)
        mean, var = stats.reshape(2, b * c).unbind(0)
        return mean, var

    @contextmanager
    def _affine(self, x: torch.Tensor) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The GroupNorm's weight and bias as float32 per (batch, channel) rows (None, None
        without affine), read at call time (see `LayerHost.weights`)."""
        m = self.module
        if not m.affine:
            yield None, None
            return
        b = x.shape[0]
        with self.host.weights(m, x) as (w, bias):  # used inside: a cast copy is released after
            w = w if w.dtype == torch.float32 else w.float()
            bias = bias if bias is None or bias.dtype == torch.float32 else bias.float()
            if b > 1:
                w, bias = w.repeat(b), (None if bias is None else bias.repeat(b))
            yield w, bias

    def _apply(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, affine=None) -> torch.Tensor:
        """The native batch-norm inference kernel over (batch, channel) rows, whose running
        statistics ([B C] float32) are each channel's group's image-wide mean and variance, with
        the GroupNorm's affine per channel (`affine`: `_affine`'s, when the caller holds it). It
        computes (x - mean) * rsqrt(var + eps) * w + b as the native GroupNorm kernel does, and
        reads x once (the GroupNorm kernel reads it twice, once for statistics we already have)."""
        b, c = x.shape[:2]
        rows = x.reshape(1, b * c, -1)
        if affine is not None:
            return F.batch_norm(rows, mean, var, *affine, False, 0.0, self.module.eps).view_as(x)
        with self._affine(x) as (w, bias):
            return F.batch_norm(rows, mean, var, w, bias, False, 0.0, self.module.eps).view_as(x)

    def _displaced(self, ctx: CallContext, x: torch.Tensor) -> torch.Tensor:
        """A displaced step of `corrected_async_gn` (last step's image-wide mean and mean of
        squares, moved by this band's change since then; a negative variance estimate falls back
        to this band's own) or `stale_gn` (the other bands' last-step moments with this band's
        fresh ones). Both are one weighted sum of every band's stale moments: with `_Lean`'s
        buffers where the stale views stay put (eager calls), else as separate tensors."""
        corrected = ctx.mode.gn_rule is Mode.CORRECTED_ASYNC_GN
        groups = self.module.num_groups
        views, _ = self.exchange(ctx, ((2, x.shape[0], groups), torch.float32))
        memo = self.memo(views) if self.in_place(ctx, views) else None
        lean = memo.get("lean") if memo is not None else None
        if lean is None and memo is not None:
            rows = rows_of(views)
            if rows is not None:
                lean = memo["lean"] = _Lean(rows, self._weights(ctx, corrected).view(1, -1), x, groups, corrected)
        if lean is not None:
            return self._displaced_lean(ctx, x, views, lean)
        # The same arithmetic as separate tensors (under compile, or where the views may move):
        # the same bits as `_displaced_lean`.
        fresh = band_moments(x, groups)
        weights = self.memoized(views, "weights", lambda: self._weights(ctx, corrected)).view(1, -1)
        moments = torch.stack(list(views))  # [P, 2, B, G] (a plain list: traceable)
        if corrected:
            est = torch.addmm(fresh.view(1, -1), weights, moments.view(len(views), -1))
        else:
            moments[ctx.rank] = fresh
            est = torch.mm(weights, moments.view(len(views), -1))
        mean, second = est.view_as(fresh).unbind(0)
        var = torch.addcmul(second, mean, mean, value=-1)
        if corrected:
            mean_l, second_l = fresh.unbind(0)
            var = torch.where(var < 0, torch.addcmul(second_l, mean_l, mean_l, value=-1).clamp_min_(0.0), var)
        else:
            var = var.clamp_min_(0.0)
        if not self.in_place(ctx, views):
            self.publish(ctx, fresh)
        else:  # (compiled, the write joins the kernel computing it)
            views[ctx.rank].copy_(fresh)
            self.publish(ctx, None)
        return self._normalize(x, mean, var)

    @staticmethod
    def _weights(ctx: CallContext, corrected: bool) -> torch.Tensor:
        """[P] weights of every band's moments, made on the device (no host data): corrected,
        w - e_rank over the stale ones (this band's stale moments are taken out, its fresh ones
        added whole); stale, w over the stale ones with this band's replaced by its fresh ones."""
        weights = ctx.band_weights.clone()
        if corrected:
            weights[ctx.rank].sub_(1)
        return weights

    def _displaced_lean(self, ctx: CallContext, x: torch.Tensor, views: list[torch.Tensor], lean: _Lean) -> torch.Tensor:
        """`_displaced` in `lean`'s buffers. stale_gn writes this band's fresh moments into its own
        slot first, so one product with the band weights gives the estimate; corrected_async_gn
        reads its own stale moments, then writes the fresh ones."""
        lean.fill(x)
        own = views[ctx.rank]
        if lean.corrected:
            torch.addmm(lean.fresh_row, lean.weights, lean.rows, out=lean.est_row)
            own.copy_(lean.fresh)
        else:
            own.copy_(lean.fresh)
            torch.mm(lean.weights, lean.rows, out=lean.est_row)
        # The write into its own slot is issued before the publish that may launch the gather.
        self.publish(ctx, None)
        lean.var_g.addcmul_(lean.mean_g, lean.mean_g, value=-1)
        if lean.corrected:
            torch.addcmul(lean.second_l, lean.mean_l, lean.mean_l, value=-1, out=lean.var_l).clamp_min_(0.0)
            torch.where(lean.var_g < 0, lean.var_l, lean.var_g, out=lean.var_g)
        else:
            lean.var_g.clamp_min_(0.0)
        lean.spread_()
        return self._apply(x, lean.mean_c, lean.var_c)

    def _can_carry(self, ctx: CallContext, x: torch.Tensor) -> bool:
        """The next conv's halo can travel with the statistics: a 4-D input and every band at
        least as tall as the halo (no zero-filled slot rows, which SiLU would not keep zero)."""
        conv = self.feeds
        if conv is None or x.dim() != 4:
            return False
        return all(ctx.bands.scaled(j, x.shape[2], ctx.rank) >= conv.halo for j in range(ctx.bands.parts))

    def _global_with_halo(self, ctx: CallContext, x: torch.Tensor, buffers: _SyncStats | None) -> torch.Tensor:
        """One exchange for [moments | edge rows of x]; the moments go on as this layer's own
        exchange (where kept as stale state), the neighbours' rows, normalized and activated here
        with the same kernels as their own band's, as the conv's."""
        m, conv = self.module, self.feeds
        groups = m.num_groups
        b, c = x.shape[:2]
        n = 2 * b * groups
        edge = conv.slot_shape(x)
        if buffers is None:
            fresh = band_moments(x, groups)
            raw = conv.edge_rows(x)
            payload = torch.cat([fresh.reshape(-1), raw.reshape(-1) if raw.dtype == torch.float32 else raw.reshape(-1).float()])
        else:  # the moments and the edge rows are written straight into what is sent
            payload = torch.empty(n + math.prod(edge), dtype=torch.float32, device=x.device)
            fresh = payload[:n].view(2, b, groups)
            group_sums(x, groups, *fresh.unbind(0))
            fresh.mul_(buffers.inv_n)
            conv.edge_rows(x, out=payload[n:].view(edge))
        views = ctx.exchanger.gather(self.name + "+halo", payload, None, keep=False)
        rows = rows_of(views) if buffers is not None else None
        rows = torch.stack(list(views)) if rows is None else rows  # [P, payload]
        if ctx.mode.gn_rule in STALE_RULES:  # kept: read stale later
            ctx.exchanger.provide(self.name, rows[:, :n], tuple(fresh.shape))
            ctx.exchanger.gather(self.name, fresh, None)
        if buffers is None:
            mean_c, var_c = self._channels(x, *combine_stats(rows[:, :n], ctx.band_weights.view(1, -1)))
        else:
            buffers.combine(rows[:, :n])
            mean_c, var_c = buffers.mean_c, buffers.var_c
        with self._affine(x) as affine:
            # Every band's rows, normalized and activated as their own band does it.
            halo = F.batch_norm(rows[:, n:].view(len(views), b * c, -1), mean_c, var_c, *affine, False, 0.0, m.eps)
            F.silu(halo, inplace=True)
            slot_dtype = ctx.comm_dtype or x.dtype
            halo = halo if halo.dtype == slot_dtype else halo.to(slot_dtype)
            ctx.exchanger.provide(conv.name, halo.view(len(views), -1), edge)
            return self._apply(x, mean_c, var_c, affine)

    def _global(self, ctx: CallContext, x: torch.Tensor, buffers: _SyncStats | None) -> torch.Tensor:
        """Synchronous statistics (every sync step; every step of `sync_gn`): this band's moments,
        one blocking gather, Chan's combination; in `buffers` where given, else as separate tensors
        (the same bits)."""
        keep = ctx.mode.gn_rule in STALE_RULES
        groups = self.module.num_groups
        if buffers is None:
            views = ctx.exchanger.gather(self.name, band_moments(x, groups), None, keep=keep)
            rows = torch.stack(list(views)).view(len(views), -1)
            return self._normalize(x, *combine_stats(rows, ctx.band_weights.view(1, -1)))
        buffers.fill(x)
        views = ctx.exchanger.gather(self.name, buffers.fresh, None, keep=keep)
        rows = rows_of(views)
        buffers.combine(torch.stack(list(views)).view(len(views), -1) if rows is None else rows)
        return self._apply(x, buffers.mean_c, buffers.var_c)
