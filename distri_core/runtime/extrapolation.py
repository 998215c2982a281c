"""Stale halos and K/V extrapolated from their last two versions (mode `corrected_extrapolated`).

A displaced step i reads the other bands' activations of the previous call, X_{i-1}, computed at
timestep t_{i-1}, where the exact model would read X_i. `ExtrapolatingBuffers` keeps one more
version, X_{i-2} (at t_{i-2}), and hands the layers

    X_{i-1} + f (X_{i-1} - X_{i-2}),   f = (t_i - t_{i-1}) / (t_{i-1} - t_{i-2}) clamped to [0, 1]

for the other bands' parts: a first-order prediction along the timesteps the model is given (f = 0
until a key has two earlier calls, and where the timesteps do not move). It costs no traffic.

Each bucket of extrapolated exchanges has two storages that take turns: the latest (X_{i-1},
what the last call gathered) and the target, which holds X_{i-2} until a displaced call overwrites
its other ranks' rows with the prediction, in place, one `lerp` per contiguous block of rows. The
layers read the prediction from the target, write their fresh tensors into its own row, and the
call's all-gather fills it: it is the next call's latest, and the latest becomes the target. A
synchronous call writes what it gathers into the target. So the memory is twice the stale buckets
of the extrapolated exchanges, a displaced call adds one or two elementwise passes per bucket and
no copy, and each storage's views stay put (the layers' memos hold, one per storage).

Everything stays on the device: the timesteps of the last two calls are 0-dim tensors where the
timesteps are, and f is computed there, so nothing waits for the device and a compiled step does
not see a new Python float per call. GroupNorm statistics are never extrapolated (their own
buckets, read as in `StaleBuffers`): `corrected_async_gn` already adds this band's drift to the
image's, and an extrapolated other band would count its drift twice (1.4-3.2x worse in
docs/bench/extrapolate.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers.base import StaleViews
from .comm import StaleBuffers, _Bucket, _eager, _Entry


@dataclass
class _Turns:
    """The second storage of one bucket of extrapolated exchanges, and each entry's views of it.
    `filled`: the target holds a version (else a displaced read copies the latest as it is)."""

    rows: torch.Tensor
    views: dict[str, StaleViews]
    filled: bool = False
    ready: bool = False  # the target was prepared (predicted) in this call


@dataclass
class ExtrapolatingBuffers(StaleBuffers):
    """`StaleBuffers` whose displaced reads of the exchanges in `extrapolated` (conv halos and
    attention K/V, named by the engine) give the other ranks' parts extrapolated; every other
    exchange reads as in `StaleBuffers`. The engine calls `observe(timesteps)` before each call."""

    extrapolated: frozenset[str] = frozenset()
    factor: torch.Tensor | None = None  # this call's f, a 0-dim float32 tensor (0 until two earlier calls)
    _times: list[torch.Tensor] = field(default_factory=list)  # t of the last two calls, newest first
    _turns: dict[int, _Turns] = field(default_factory=dict)  # by id of the bucket (they live as long as we do)
    _weights: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # -f in each bucket dtype

    def observe(self, timesteps) -> None:
        """This call's timestep (the first of the batch; a tensor, or a number): sets `factor` from
        it and the last two calls' timesteps, where the timesteps are (a CPU 0-dim tensor is a
        scalar to CUDA kernels)."""
        if isinstance(timesteps, torch.Tensor):
            t = timesteps.detach().reshape(-1)[0].to(torch.float32, copy=True)
        else:
            device = self.flat[0].device if self.flat else torch.device("cpu")
            t = torch.full((), float(timesteps), dtype=torch.float32, device=device)
        if len(self._times) == 2:
            t1, t2 = self._times
            step = t1 - t2
            f = torch.where(step != 0, (t - t1) / torch.where(step != 0, step, 1.0), 0.0).clamp_(0.0, 1.0)
        else:
            f = torch.zeros_like(t)
        self.factor = f
        self._weights.clear()
        self._times = [t, *self._times[:1]]

    def _extrapolates(self, entry: _Entry) -> bool:
        return entry.name.split("#")[0] in self.extrapolated

    def bucket_key(self, entry: _Entry) -> object:
        """Extrapolated exchanges get buckets of their own (they take turns between two storages)."""
        return entry.dtype, self._extrapolates(entry)

    # -- per call: the storages take turns --------------------------------------------------
    def begin_call(self) -> None:
        super().begin_call()
        for bucket in self.buckets:
            if self._extrapolates(bucket.entries[0]):
                self._turn(bucket)

    def _turn(self, bucket: _Bucket) -> None:
        """Make the other storage the target: the bucket's rows and its entries' views."""
        turns = self._turns.get(id(bucket))
        if turns is None:
            rows = torch.empty_like(bucket.rows)
            views, off = {}, 0
            for e in bucket.entries:
                views[e.name] = StaleViews(e.views_of(rows[:, off:off + e.slot]))
                off += e.slot
            turns = self._turns[id(bucket)] = _Turns(rows, views)
        latest_rows = bucket.rows
        bucket.rows, turns.rows = turns.rows, latest_rows
        for e in bucket.entries:
            e.views, turns.views[e.name] = turns.views[e.name], e.views
        turns.ready = False

    # -- reads and writes -------------------------------------------------------------------
    @_eager
    def stale(self, name, fresh, scaled_dim):
        views = super().stale(name, fresh, scaled_dim)  # the target's views; waits for the gather into the latest
        bucket = self._latest(name).bucket
        turns = self._turns.get(id(bucket))
        if turns is not None and not turns.ready:
            self._predict(bucket, turns)
        return views

    @_eager
    def _finish_gather(self, name: str, entry: _Entry, rows: torch.Tensor, work, keep: bool) -> list[torch.Tensor]:
        views = super()._finish_gather(name, entry, rows, work, keep)
        turns = self._turns.get(id(entry.bucket)) if keep and entry.bucket is not None else None
        if turns is not None:
            turns.filled = True  # a synchronous call writes this call's version into the target
        return views

    def _blocks(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The other ranks' rows of a [world, width] tensor, as at most two contiguous blocks."""
        return [b for b in (rows[:self.rank], rows[self.rank + 1:]) if b.shape[0]]

    def _predict(self, bucket: _Bucket, turns: _Turns) -> None:
        """The target's other ranks' rows become latest + f (latest - target), in place; a target
        that holds no version yet gets the latest as it is."""
        target, latest = bucket.rows, turns.rows
        if turns.filled:
            weight = self._weights.get(target.dtype)
            if weight is None:  # lerp wants its weight in the rows' dtype
                weight = self._weights[target.dtype] = (-self.factor).to(target.dtype)
            for out, cur in zip(self._blocks(target), self._blocks(latest), strict=True):
                torch.lerp(cur, out, weight, out=out)  # cur + (-f)(old - cur), old read before written
        else:
            for out, cur in zip(self._blocks(target), self._blocks(latest), strict=True):
                out.copy_(cur)
        turns.filled = turns.ready = True

    @property
    def extra_bytes(self) -> int:
        """The second storages: what extrapolating adds to the stale state."""
        return sum(t.rows.numel() * t.rows.element_size() for t in self._turns.values())

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.extra_bytes

    def close(self) -> None:
        super().close()
        self._turns.clear()
        self._times = []
        self.factor = None
