"""Messages between the host and its workers: length-prefixed pickles over the private pipes
the host created for each worker (never a socket), and nested inputs whose tensors travel
through shared memory."""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .shm import SharedArena, aligned

_HEADER = struct.Struct("<Q")


def send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _HEADER.pack(len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd: int) -> Any:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, n))


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a message lies in the arena."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def flatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace every tensor in nested dicts/lists/tuples by its index in `tensors`."""
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return _Slot(len(tensors) - 1)
    if isinstance(tree, dict):
        return {k: flatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(flatten(v, tensors) for v in tree)
    return tree


def unflatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(tree, _Slot):
        return tensors[tree.index]
    if isinstance(tree, dict):
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(unflatten(v, tensors) for v in tree)
    return tree


@dataclass(frozen=True)
class _Slot:
    index: int


def plan(tensors: list[torch.Tensor], start: int = 0) -> tuple[list[TensorRef], int]:
    """Offsets for `tensors` packed from `start`; returns the refs and the end offset."""
    return plan_shapes([(tuple(t.shape), t.dtype) for t in tensors], start)


def plan_shapes(items: list[tuple[tuple[int, ...], torch.dtype]], start: int = 0) -> tuple[list[TensorRef], int]:
    refs, offset = [], aligned(start)
    for shape, dtype in items:
        ref = TensorRef(offset, tuple(shape), dtype)
        refs.append(ref)
        offset = aligned(offset + ref.nbytes)
    return refs, offset


@dataclass
class Packed:
    """A nested input laid out for an arena: `tree` (its tensors replaced by slots) travels in
    the message, the tensors at `refs`; `end` is the first offset after them."""

    tree: Any
    tensors: list[torch.Tensor]
    refs: list[TensorRef]
    end: int

    def write(self, arena: SharedArena) -> None:
        write(arena, self.refs, self.tensors)


def pack(tree: Any) -> Packed:
    """`tree`'s tensors flattened and planned from offset 0 (what every call message carries)."""
    tensors: list[torch.Tensor] = []
    flat = flatten(tree, tensors)
    refs, end = plan(tensors)
    return Packed(flat, tensors, refs, end)


def write(arena: SharedArena, refs: list[TensorRef], tensors: list[torch.Tensor]) -> None:
    for ref, t in zip(refs, tensors, strict=True):
        arena.view(ref.offset, ref.shape, ref.dtype).copy_(t.detach())


def read(arena: SharedArena, refs: list[TensorRef]) -> list[torch.Tensor]:
    return [arena.view(r.offset, r.shape, r.dtype) for r in refs]
