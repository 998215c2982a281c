"""Activation exchange between the ranks of a patch group, with one-step-stale buffers.

`StaleBuffers` implements the layers' `Exchanger` for one stale key (conditioning, input shape,
layout). Its phases run in this order and are checked:

1. register - during the key's first call (always synchronous) every exchange is recorded in
   call order with its per-rank shapes, and its gathered tensors are kept;
2. allocate - after that call, the exchanges are packed into buckets of about `bucket_bytes`,
   all in one flat buffer per dtype, rank-major inside each bucket, and filled;
3. enqueue  - in an asynchronous call each layer publishes its fresh tensor into its own row;
   once every exchange of a bucket is in, one asynchronous all-gather sends the whole bucket,
   overlapping the rest of the forward;
4. drain    - in the next call a layer waits for its bucket's gather before it reads.

The same code runs on gloo (CPU) and NCCL (CUDA): NCCL orders the collective after the copies
on the current stream, and `wait()` orders later reads after it.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..layout import BandPlan


def all_gather_rows(rows: torch.Tensor, rank: int, group, async_op: bool = False):
    """In-place all-gather of a [world, n] tensor whose row `rank` holds this rank's data."""
    flat = rows.view(-1)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(flat, rows[rank], group=group, async_op=async_op)


@dataclass
class CommStats:
    """Bytes this rank delivered to the others (slot bytes x (peers)) and collectives issued."""

    bytes_sent: int = 0
    collectives: int = 0
    calls: int = 0
    wait_s: float = 0.0  # time blocked on communication (sync gathers and pending async ones)

    def add(self, slot_bytes: int, peers: int) -> None:
        self.bytes_sent += slot_bytes * peers
        self.collectives += 1

    def snapshot(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "collectives": self.collectives, "calls": self.calls,
                "wait_s": round(self.wait_s, 4)}


class Phase(enum.Enum):
    REGISTER = "register"
    READY = "ready"
    CLOSED = "closed"


@dataclass
class _Entry:
    name: str
    shapes: list[tuple[int, ...]]  # per rank
    dtype: torch.dtype
    slot: int  # padded numel per rank
    kept: torch.Tensor | None = None  # [world, slot], from the register call
    bucket: _Bucket | None = None
    offset: int = 0

    def row(self, rank: int) -> torch.Tensor:
        return self.bucket.rows[rank, self.offset:self.offset + self.slot]

    def view(self, rank: int) -> torch.Tensor:
        numel = math.prod(self.shapes[rank])
        return self.row(rank)[:numel].view(self.shapes[rank])


@dataclass
class _Bucket:
    entries: list[_Entry]
    rows: torch.Tensor  # [world, sum of slots], a view into the flat buffer
    published: int = 0
    pending: object = None
    launched: bool = False


@dataclass
class StaleBuffers:
    group: object
    rank: int
    world: int
    bands: BandPlan
    keep_stale: bool
    stats: CommStats
    bucket_bytes: int = 8 << 20
    phase: Phase = Phase.REGISTER
    entries: dict[str, _Entry] = field(default_factory=dict)
    buckets: list[_Bucket] = field(default_factory=list)
    flat: list[torch.Tensor] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)

    # -- per call -------------------------------------------------------------------------
    def begin_call(self) -> None:
        if self.phase is Phase.CLOSED:
            raise RuntimeError("stale buffers used after close()")
        self._seen.clear()
        for b in self.buckets:
            b.published = 0
            b.launched = False

    def end_call(self) -> None:
        """Launch buckets left partly published (a layer skipped this call), then allocate
        after the register call."""
        for b in self.buckets:
            if b.published and not b.launched:
                self._launch(b)
        if self.phase is Phase.REGISTER and self.keep_stale and self.entries:
            self._allocate()
        elif self.phase is Phase.REGISTER:
            self.phase = Phase.READY

    def _unique(self, name: str) -> str:
        n = self._seen.get(name, 0)
        self._seen[name] = n + 1
        return name if n == 0 else f"{name}#{n}"

    def _shapes(self, fresh: torch.Tensor, scaled_dim: int | None) -> list[tuple[int, ...]]:
        shapes = []
        for j in range(self.world):
            s = list(fresh.shape)
            if scaled_dim is not None:
                s[scaled_dim] = self.bands.scaled(j, s[scaled_dim], self.rank)
            shapes.append(tuple(s))
        return shapes

    # -- Exchanger protocol ---------------------------------------------------------------
    def gather(self, name: str, fresh: torch.Tensor, scaled_dim: int | None,
               keep: bool = True) -> list[torch.Tensor]:
        return self.gather_start(name, fresh, scaled_dim, keep)()

    def gather_start(self, name: str, fresh: torch.Tensor, scaled_dim: int | None,
                     keep: bool = True) -> Callable[[], list[torch.Tensor]]:
        """Launch the all-gather of `gather` asynchronously; the returned function waits for it
        and returns the views. The caller computes what does not depend on it in between."""
        name = self._unique(name)
        keep = keep and self.keep_stale
        entry = self.entries.get(name) if keep else None
        if entry is None:
            shapes = self._shapes(fresh, scaled_dim)
            entry = _Entry(name, shapes, fresh.dtype, max(math.prod(s) for s in shapes))
            if keep and self.phase is Phase.REGISTER:
                self.entries[name] = entry
        rows = fresh.new_empty(self.world, entry.slot)
        rows[self.rank, :fresh.numel()].copy_(fresh.reshape(-1))
        work = all_gather_rows(rows, self.rank, self.group, async_op=True)
        self.stats.add(entry.slot * rows.element_size(), self.world - 1)

        def finish() -> list[torch.Tensor]:
            t0 = time.perf_counter()
            work.wait()
            self.stats.wait_s += time.perf_counter() - t0
            views = [rows[j, :math.prod(entry.shapes[j])].view(entry.shapes[j]) for j in range(self.world)]
            if keep:
                if entry.bucket is not None:
                    self._wait(entry.bucket)
                    entry.bucket.rows[:, entry.offset:entry.offset + entry.slot].copy_(rows)
                elif self.phase is Phase.REGISTER and name in self.entries:
                    entry.kept = rows
            return views

        return finish

    def stale(self, name: str, fresh: torch.Tensor, scaled_dim: int | None) -> list[torch.Tensor]:
        name = self._unique(name)
        entry = self.entries.get(name)
        if entry is None or entry.bucket is None:
            raise RuntimeError(
                f"no stale activations for {name}: it was not part of this key's first (synchronous) "
                "call; the model took a different path than in that call"
            )
        if tuple(fresh.shape) != entry.shapes[self.rank] or fresh.dtype != entry.dtype:
            raise RuntimeError(f"{name}: got {tuple(fresh.shape)} {fresh.dtype}, stale state holds "
                               f"{entry.shapes[self.rank]} {entry.dtype}; the stale key must include the input shape")
        self._wait(entry.bucket)
        return [entry.view(j) for j in range(self.world)]

    def publish(self, name: str, fresh: torch.Tensor) -> None:
        suffix = self._seen.get(name, 1) - 1
        entry = self.entries[name if suffix == 0 else f"{name}#{suffix}"]
        entry.row(self.rank)[:fresh.numel()].copy_(fresh.reshape(-1))
        bucket = entry.bucket
        bucket.published += 1
        if bucket.published == len(bucket.entries):
            self._launch(bucket)

    # -- buckets ----------------------------------------------------------------------------
    def _allocate(self) -> None:
        by_dtype: dict[torch.dtype, list[_Entry]] = {}
        for e in self.entries.values():
            by_dtype.setdefault(e.dtype, []).append(e)
        for dtype, entries in by_dtype.items():
            device = entries[0].kept.device
            total = sum(e.slot for e in entries) * self.world
            flat = torch.empty(total, dtype=dtype, device=device)
            self.flat.append(flat)
            itemsize = flat.element_size()
            start, group = 0, []
            for i, e in enumerate(entries):
                group.append(e)
                size = sum(x.slot for x in group)
                if size * itemsize >= self.bucket_bytes or i == len(entries) - 1:
                    rows = flat[start:start + size * self.world].view(self.world, size)
                    bucket = _Bucket(group, rows)
                    off = 0
                    for x in group:
                        x.bucket, x.offset = bucket, off
                        rows[:, off:off + x.slot].copy_(x.kept)
                        x.kept = None
                        off += x.slot
                    self.buckets.append(bucket)
                    start += size * self.world
                    group = []
        self.phase = Phase.READY

    def _launch(self, bucket: _Bucket) -> None:
        bucket.pending = all_gather_rows(bucket.rows, self.rank, self.group, async_op=True)
        bucket.launched = True
        self.stats.add(bucket.rows.shape[1] * bucket.rows.element_size(), self.world - 1)

    def _wait(self, bucket: _Bucket) -> None:
        if bucket.pending is not None:
            t0 = time.perf_counter()
            bucket.pending.wait()
            self.stats.wait_s += time.perf_counter() - t0
            bucket.pending = None

    def drain(self) -> None:
        """Wait for every gather in flight (before freeing buffers or changing layout)."""
        for b in self.buckets:
            self._wait(b)

    def close(self) -> None:
        self.drain()
        self.entries.clear()
        self.buckets.clear()
        self.flat.clear()
        self.phase = Phase.CLOSED

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flat)
