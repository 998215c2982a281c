"""Activation exchange between the ranks of a patch group, with one-step-stale buffers.

`StaleBuffers` implements the layers' `Exchanger` for one stale key (conditioning, input shape,
layout). Its phases run in this order and are checked:

1. register - during the key's first call (always synchronous) every exchange is recorded in
   call order with its per-rank shapes, and its gathered tensors are kept;
2. allocate - during that same call, as soon as the kept exchanges of one dtype reach about
   `bucket_bytes` they move into a bucket of their own (rank-major, allocated at its final
   size) and the kept copies are freed, so the first call never holds its stale state twice;
3. enqueue  - in an asynchronous call each layer publishes its fresh tensor into its own row;
   once every exchange of a bucket is in, one asynchronous all-gather sends the whole bucket,
   overlapping the rest of the forward;
4. drain    - in the next call a layer waits for its bucket's gather before it reads.

The same code runs on gloo (CPU) and NCCL (CUDA): NCCL orders the collective after the copies
on the current stream, and `wait()` orders later reads after it. Time spent waiting is measured
with CUDA events on a GPU (an NCCL `wait()` returns at once on the host; the stream is what
waits) and with the host clock on a CPU.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..layers.base import StaleViews
from ..layout import BandPlan
from .stats import CommStats


class _Done:
    """A finished collective (what `all_gather_rows` returns after a staged, blocking gather)."""

    def wait(self) -> bool:
        return True


def all_gather_rows(rows: torch.Tensor, rank: int, group, async_op: bool = False):
    """In-place all-gather of a [world, n] tensor whose row `rank` holds this rank's data."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if rows.is_cuda and dist.get_backend(group) == "gloo":
        # Several ranks on one GPU (a test-only layout; NCCL refuses it): gloo's CUDA support is
        # partial, so the gather goes through host memory, blocking.
        host = rows.cpu()
        gather(host.view(-1), host[rank], group=group)
        rows.copy_(host)
        return _Done() if async_op else None
    return gather(rows.view(-1), rows[rank], group=group, async_op=async_op)


def _eager(fn):
    """Marks an exchange that must run eagerly under torch.compile (see `compiled_exchanges`)."""
    fn._distri_eager = True
    return fn


def run_eagerly(owner, name: str) -> None:
    """Replace `owner.name` (a class's method or a module's function) by itself wrapped in
    `torch.compiler.disable`, once: torch.compile'd callers cut their graph at the call and run it
    as plain Python."""
    fn = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
    if not getattr(fn, "_distri_disabled", False):
        wrapped = torch.compiler.disable(fn)
        wrapped._distri_disabled = True
        setattr(owner, name, wrapped)


def compiled_exchanges() -> None:
    """Make every exchange (of StaleBuffers and its subclasses) run eagerly inside torch.compile'd
    code (engine `compile`): the compiler cuts its graph at the call, so the collectives, their
    waits and the buffers' bookkeeping stay plain Python between compiled graphs. Called at every
    engine's first compiled call, not at import: importing the compiler costs about two seconds,
    which a run without `compile` never pays."""
    names = {n for n, fn in vars(StaleBuffers).items() if getattr(fn, "_distri_eager", False)}
    classes, seen = [StaleBuffers], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        classes.extend(cls.__subclasses__())
        for name in names & set(vars(cls)):
            run_eagerly(cls, name)


def _spec(fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype]) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of an exchange's tensor, or the (shape, dtype) given in its place."""
    if isinstance(fresh, torch.Tensor):
        return tuple(fresh.shape), fresh.dtype
    return tuple(fresh[0]), fresh[1]


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
    # Every rank's tensor as a view of the bucket, made once when the bucket is allocated: its
    # storage never moves, so a call reads and publishes through these without building views.
    views: StaleViews = field(default_factory=lambda: StaleViews([]))

    def place(self, bucket: _Bucket, offset: int) -> None:
        self.bucket, self.offset = bucket, offset
        self.views = StaleViews(self.views_of(bucket.rows[:, offset:offset + self.slot]))

    def views_of(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor in a [world, slot] of this exchange (one view and an unbind where
        all ranks send the same shape, unpadded: the common case, and fewer operators)."""
        shapes = self.shapes
        if all(s == shapes[0] for s in shapes) and math.prod(shapes[0]) == self.slot and rows.is_contiguous():
            return list(rows.view(len(shapes), *shapes[0]).unbind(0))
        return [rows[j, :math.prod(shape)].view(shape) for j, shape in enumerate(shapes)]


@dataclass
class _Bucket:
    entries: list[_Entry]
    rows: torch.Tensor  # [world, sum of slots], rank-major
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
    flat: list[torch.Tensor] = field(default_factory=list)  # one storage per bucket
    peak_bytes: int = 0  # most memory held at once for stale state (kept copies + buckets)
    _seen: dict[str, int] = field(default_factory=dict)
    _open: dict[object, list[_Entry]] = field(default_factory=dict)  # kept, not yet in a bucket (by bucket key)
    _kept_bytes: int = 0
    _provided: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = field(default_factory=dict)

    # -- per call -------------------------------------------------------------------------
    def begin_call(self) -> None:
        if self.phase is Phase.CLOSED:
            raise RuntimeError("stale buffers used after close()")
        self._seen.clear()
        self._provided.clear()
        for b in self.buckets:
            b.published = 0
            b.launched = False

    def end_call(self) -> None:
        """Launch buckets left partly published (a layer skipped this call); after the register
        call, put what is still kept into buckets."""
        for b in self.buckets:
            if b.published and not b.launched:
                self._launch(b)
        if self.phase is Phase.REGISTER:
            for key in list(self._open):
                self._close(key)
            self.phase = Phase.READY

    def _next(self, name: str) -> str:
        """The name the next exchange of `name` in this call will have (see `_unique`)."""
        n = self._seen.get(name, 0)
        return name if n == 0 else f"{name}#{n}"

    def _unique(self, name: str) -> str:
        unique = self._next(name)
        self._seen[name] = self._seen.get(name, 0) + 1
        return unique

    def _shapes(self, shape: tuple[int, ...], scaled_dim: int | None) -> list[tuple[int, ...]]:
        shapes = []
        for j in range(self.world):
            s = list(shape)
            if scaled_dim is not None:
                s[scaled_dim] = self.bands.scaled(j, s[scaled_dim], self.rank)
            shapes.append(tuple(s))
        return shapes

    # -- Exchanger protocol ---------------------------------------------------------------
    @_eager
    def gather(self, name: str, fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype], scaled_dim: int | None,
               keep: bool = True) -> list[torch.Tensor]:
        return self.gather_start(name, fresh, scaled_dim, keep)()

    @_eager
    def gather_start(self, name: str, fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype], scaled_dim: int | None,
                     keep: bool = True) -> Callable[[], list[torch.Tensor]]:
        """Launch the all-gather of `gather` asynchronously; the returned function waits for it
        and returns the views. The caller computes what does not depend on it in between."""
        name = self._unique(name)
        keep = keep and self.keep_stale
        shape, dtype = _spec(fresh)
        entry = self.entries.get(name) if keep else None
        if entry is None:
            shapes = self._shapes(shape, scaled_dim)
            entry = _Entry(name, shapes, dtype, max(math.prod(s) for s in shapes))
            if keep and self.phase is Phase.REGISTER:
                self.entries[name] = entry
        provided, expected = self._provided.pop(name, (None, None))
        if provided is not None and expected == shape and provided.shape == (self.world, entry.slot):
            rows, work = provided, _Done()  # gathered already, inside an earlier exchange
        elif not isinstance(fresh, torch.Tensor):
            raise RuntimeError(f"{name}: only its {shape} {dtype} was given, but no earlier exchange "
                               f"carried its tensors for that shape (carried: {expected}); pass the tensor")
        else:
            rows = fresh.new_empty(self.world, entry.slot)
            rows[self.rank, :fresh.numel()].copy_(fresh.reshape(-1))
            work = self._all_gather(rows)
            self.stats.add(entry.slot * rows.element_size(), self.world - 1)

        return functools.partial(self._finish_gather, name, entry, rows, work, keep)

    @_eager
    def _finish_gather(self, name: str, entry: _Entry, rows: torch.Tensor, work, keep: bool) -> list[torch.Tensor]:
        """The second half of `gather_start`: wait for the gather, keep it as stale state, give
        every rank's view."""
        with self.stats.waiting(rows.device):
            work.wait()
        views = entry.views_of(rows)
        if keep:
            if entry.bucket is not None:
                self._wait(entry.bucket)
                entry.bucket.rows[:, entry.offset:entry.offset + entry.slot].copy_(rows)
            elif self.phase is Phase.REGISTER and name in self.entries:
                self._keep(entry, rows)
        return views

    @_eager
    def provide(self, name: str, rows: torch.Tensor, fresh_shape: tuple[int, ...]) -> None:
        """Every rank's tensor for the next exchange of `name` in this call, [world, slot], already
        known (carried by an earlier exchange): that exchange then sends nothing. It is used only
        if its fresh tensor has `fresh_shape` (else it is gathered as usual, on every rank alike)."""
        self._provided[self._next(name)] = (rows, tuple(fresh_shape))

    def provided(self, name: str) -> bool:
        """The next gather of `name` in this call has its tensors already (see `provide`)."""
        return self._next(name) in self._provided

    @_eager
    def stale(self, name: str, fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype],
              scaled_dim: int | None) -> list[torch.Tensor]:
        name = self._unique(name)
        entry = self.entries.get(name)
        if entry is None or entry.bucket is None:
            raise RuntimeError(
                f"no stale activations for {name}: it was not part of this key's first (synchronous) "
                "call; the model took a different path than in that call"
            )
        shape, dtype = _spec(fresh)
        if shape != entry.shapes[self.rank] or dtype != entry.dtype:
            raise RuntimeError(f"{name}: got {shape} {dtype}, stale state holds "
                               f"{entry.shapes[self.rank]} {entry.dtype}; the stale key must include the input shape")
        self._wait(entry.bucket)
        return entry.views

    def _latest(self, name: str) -> _Entry:
        """The entry of the last exchange of `name` in this call (see `_unique`)."""
        n = self._seen.get(name, 1) - 1
        return self.entries[name if n == 0 else f"{name}#{n}"]

    @_eager
    def publish(self, name: str, fresh: torch.Tensor | None) -> None:
        entry = self._latest(name)
        if fresh is not None:  # None: the layer wrote it into its own view (see stale)
            entry.views[self.rank].copy_(fresh)
        bucket = entry.bucket
        bucket.published += 1
        if bucket.published == len(bucket.entries):
            self._launch(bucket)

    # -- buckets ----------------------------------------------------------------------------
    def _keep(self, entry: _Entry, rows: torch.Tensor) -> None:
        """Hold a register-call exchange until its bucket is full enough to allocate."""
        entry.kept = rows
        self._kept_bytes += rows.numel() * rows.element_size()
        self.peak_bytes = max(self.peak_bytes, self.nbytes + self._kept_bytes)
        key = self.bucket_key(entry)
        group = self._open.setdefault(key, [])
        group.append(entry)
        if sum(e.slot for e in group) * rows.element_size() >= self.bucket_bytes:
            self._close(key)

    def bucket_key(self, entry: _Entry) -> object:
        """Exchanges share a bucket when they have the same key: their dtype."""
        return entry.dtype

    def _close(self, key: object) -> None:
        """Allocate the bucket of the kept exchanges of one key at its final size, move them in,
        and free the kept copies."""
        group = self._open.pop(key)
        dtype = group[0].dtype
        width = sum(e.slot for e in group)
        storage = torch.empty(self.world * width, dtype=dtype, device=group[0].kept.device)
        rows = storage.view(self.world, width)
        bucket = _Bucket(group, rows)
        self.flat.append(storage)
        self.peak_bytes = max(self.peak_bytes, self.nbytes + self._kept_bytes)
        off = 0
        for e in group:
            e.place(bucket, off)
            rows[:, off:off + e.slot].copy_(e.kept)
            self._kept_bytes -= e.kept.numel() * e.kept.element_size()
            e.kept = None
            off += e.slot
        self.buckets.append(bucket)

    def _all_gather(self, rows: torch.Tensor):
        """Start the all-gather of `rows` (row `self.rank` is this rank's); returns its work."""
        return all_gather_rows(rows, self.rank, self.group, async_op=True)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.pending = self._all_gather(bucket.rows)
        bucket.launched = True
        self.stats.add(bucket.rows.shape[1] * bucket.rows.element_size(), self.world - 1)

    def _wait(self, bucket: _Bucket) -> None:
        if bucket.pending is not None:
            with self.stats.waiting(bucket.rows.device):
                bucket.pending.wait()
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
        self._open.clear()
        self._kept_bytes = 0
        self.phase = Phase.CLOSED

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flat)
