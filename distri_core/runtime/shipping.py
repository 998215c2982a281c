"""Weight shipping: how a model's weights get from the host into every worker.

Two paths, one protocol:

- shared (CPU ranks): the weights are written once into one shared-memory segment and every
  CPU rank computes straight from it (one copy for all ranks, none to load);
- chunked (GPU ranks, or CPU ranks that copy): the worker allocates the model on its device,
  then the weights stream through two alternating segments of `chunk_bytes` each (the host fills
  one while the workers copy the other), so the host's peak stays near the model's own size.

Before anything is written, the host checks that /dev/shm and host memory can hold what the path
needs, and a worker checks its GPU's free memory before it allocates: a model that cannot fit is
a `ResourceError` naming the bytes and the fix, never a killed server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import wire
from .devices import dir_free, fmt_bytes, mem_available
from .errors import Cancelled, PoolError, ResourceError
from .procs import Interrupted, Workers
from .shm import SharedArena, aligned, shm_dir, shortage_message

CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the model the weights are loaded into.

    factory:  'package.module:callable' (or '/path/file.py:callable') returning the UNet module;
              called under torch.device('meta') with `kwargs`, then given the shipped weights.
    kwargs:   plain data for the factory (classes and dtypes pickle by reference).
    dtype:    the dtype the workers compute in.
    storage_dtype: when set, floating weights stay stored in it (fp8) and the model's own ops
              cast them per call, as ComfyUI's manual_cast ops do; else they are cast to `dtype`.
    accessor: optional 'module:callable' weight accessor for the distributed layers (see
              distri_core.layers.base.WeightAccessor); default: the module's parameters.
    setup:    optional 'module:callable' run (with `setup_kwargs`) in the worker before the
              factory is resolved, e.g. to make the host application importable there.
    sys_path: import paths the worker needs (e.g. the ComfyUI checkout).
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    storage_dtype: torch.dtype | None = None
    accessor: str | None = None
    setup: str | None = None
    setup_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sys_path: tuple[str, ...] = ()


@dataclass
class LazyWeights:
    """Weights announced by (name, shape, dtype) and produced one at a time by `get(name)`."""

    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    get: Callable[[str], torch.Tensor]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> LazyWeights:
        return cls([(k, tuple(v.shape), v.dtype) for k, v in state.items()], state.__getitem__)

    @property
    def nbytes(self) -> int:
        return sum(wire.TensorRef(0, shape, dtype).nbytes for _, shape, dtype in self.entries)


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + count) of the flattened weight `name`, at `offset` in a chunk."""

    name: str
    start: int
    count: int
    offset: int
    dtype: torch.dtype


def plan_chunks(entries: list[tuple[str, tuple[int, ...], torch.dtype]], chunk_bytes: int) -> list[list[Piece]]:
    """Cut the weights into chunks of at most `chunk_bytes` (a weight larger than a chunk spans
    several), in announcement order."""
    if chunk_bytes < 64:
        raise ValueError(f"chunk_bytes={chunk_bytes} is too small; use at least 64 (default {CHUNK_BYTES})")
    chunks: list[list[Piece]] = [[]]
    used = 0
    for name, shape, dtype in entries:
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = math.prod(shape)
        start = 0
        while True:
            offset = aligned(used)
            space = (chunk_bytes - offset) // itemsize
            if space <= 0:
                chunks.append([])
                offset, space = 0, chunk_bytes // itemsize
            count = min(numel - start, space)
            chunks[-1].append(Piece(name, start, count, offset, dtype))
            used = offset + count * itemsize
            start += count
            if start >= numel:
                break
    return [c for c in chunks if c]


def _fs_type(path: str) -> str:
    """The file system type holding `path` (longest mount point in /proc/mounts), or ''."""
    best, kind = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def check_host_room(shm_bytes: int, ram_bytes: int, what: str) -> None:
    """Refuse, with the numbers and the fix, when the shared-memory directory or the host's memory
    cannot take `shm_bytes` / `ram_bytes` more."""
    directory = shm_dir()
    free = dir_free(directory)
    if free is not None and shm_bytes > free:
        raise ResourceError(shortage_message(shm_bytes, directory, what))
    if _fs_type(directory) in ("tmpfs", "shm", "ramfs"):
        ram_bytes = max(ram_bytes, shm_bytes)  # a tmpfs lives in memory
    available = mem_available()
    if available is not None and ram_bytes > available:
        raise ResourceError(f"{what} needs {fmt_bytes(ram_bytes)} more host memory and {fmt_bytes(available)} is "
                            "available; free memory (other models, other programs), run the workers on GPUs (their "
                            "weights then stream in chunks), or use a smaller model or dtype")


def _stop_if(interrupted: Interrupted | None) -> None:
    """Between two weights: a cancel leaves the workers idle and usable (the model is not)."""
    if interrupted is not None and interrupted():
        raise Cancelled("cancelled while shipping the model's weights; the workers stay ready and the next run "
                        "ships the model again", kept=True)


def _checked(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise PoolError(f"weight {name}: got {tuple(tensor.shape)} {tensor.dtype}, announced {tuple(shape)} {dtype}")
    return tensor.detach()


def ship_shared(workers: Workers, msg: dict, weights: LazyWeights, timeout: float,
                interrupted: Interrupted | None) -> list[dict]:
    """Write every weight into one segment that the (CPU) workers keep computing from."""
    names = [name for name, _, _ in weights.entries]
    refs, size = wire.plan_shapes([(shape, dtype) for _, shape, dtype in weights.entries])
    what = "loading the model into the CPU workers (one shared copy of its weights)"
    check_host_room(size, size, what)
    arena = SharedArena.create(size, what)
    try:
        for (name, shape, dtype), ref in zip(weights.entries, refs, strict=True):
            _stop_if(interrupted)
            arena.view(ref.offset, ref.shape, ref.dtype).copy_(_checked(name, weights.get(name), shape, dtype))
        return workers.request({**msg, "op": "load", "arena": arena.path, "size": size, "names": names, "refs": refs},
                               timeout, interrupted)
    finally:
        arena.unlink()


def ship_chunked(workers: Workers, msg: dict, weights: LazyWeights, timeout: float,
                 interrupted: Interrupted | None, chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Stream the weights through two alternating segments into models the workers allocated."""
    chunks = plan_chunks(weights.entries, chunk_bytes)
    sizes = [aligned(max(p.offset + p.count * torch.empty((), dtype=p.dtype).element_size() for p in c))
             for c in chunks]
    arena_size = max(sizes, default=aligned(1))
    count = min(2, len(chunks))
    largest = max((wire.TensorRef(0, s, d).nbytes for _, s, d in weights.entries), default=0)
    what = "streaming the model's weights to the workers"
    # The two segments, plus one weight being produced (a LoRA-patched float32 copy at worst).
    check_host_room(arena_size * count, arena_size * count + 2 * largest, what)
    shapes = {name: (shape, dtype) for name, shape, dtype in weights.entries}
    workers.request({**msg, "op": "load_begin", "names": list(shapes), "pieces": len(chunks)}, timeout, interrupted)
    arenas = [SharedArena.create(arena_size, what) for _ in range(count)]
    current: dict[str, torch.Tensor] = {}  # a weight that spans chunks stays until its last piece

    def fill(i: int) -> None:
        arena = arenas[i % count]
        for p in chunks[i]:
            if p.name not in current:
                _stop_if(interrupted)
                current.clear()
                current[p.name] = _checked(p.name, weights.get(p.name), *shapes[p.name]).reshape(-1)
            arena.view(p.offset, (p.count,), p.dtype).copy_(current[p.name][p.start:p.start + p.count])

    try:
        if chunks:
            fill(0)
        for i, chunk in enumerate(chunks):
            arena = arenas[i % count]
            workers.send({"op": "load_chunk", "arena": arena.path, "size": arena.size, "pieces": chunk})
            if i + 1 < len(chunks):
                fill(i + 1)  # while the workers copy chunk i
            workers.collect("load_chunk", timeout, interrupted)
            if i < count:
                arena.unlink()  # every worker has it mapped now
        current.clear()
        return workers.request({"op": "load_end"}, timeout, interrupted)
    finally:
        for arena in arenas:
            arena.unlink()



class Receiver:
    """The worker's side of the chunked path: fills the tensors of a model allocated on its
    device, piece by piece, and says what is missing at the end."""

    def __init__(self, targets: dict[str, torch.Tensor], announced: list[str]):
        unexpected = [n for n in announced if n not in targets]
        missing = [n for n in targets if n not in set(announced)]
        if unexpected or missing:
            raise ValueError(f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.targets = {n: t.view(-1) for n, t in targets.items()}
        self.filled = dict.fromkeys(targets, 0)
        self.arenas: dict[str, SharedArena] = {}

    def take(self, path: str, size: int, pieces: list[Piece]) -> None:
        arena = self.arenas.get(path)
        if arena is None:
            arena = self.arenas[path] = SharedArena.attach(path, size)
        for p in pieces:
            target = self.targets[p.name]
            target[p.start:p.start + p.count].copy_(arena.view(p.offset, (p.count,), p.dtype))
            self.filled[p.name] += p.count

    def finish(self) -> None:
        self.arenas.clear()
        short = [n for n, t in self.targets.items() if self.filled[n] != t.numel()]
        if short:
            raise ValueError(f"weights incomplete after shipping: {short[:5]}")
