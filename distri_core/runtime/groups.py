"""Process groups for one engine: all its ranks, and the two halves used by CFG split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """`group` holds every rank of the engine (None: torch's default group); `rank` and `size`
    are relative to it. `halves[i]` is the process group of half i when the size is even (None
    for a one-rank half, which never communicates)."""

    group: object
    rank: int
    size: int
    halves: tuple[object, object] | None


def single() -> ParallelGroups:
    """One rank, no torch.distributed at all."""
    return ParallelGroups(None, 0, 1, None)


def build_groups(ranks: Sequence[int] | None = None, split_halves: bool = True) -> ParallelGroups | None:
    """The groups of an engine on `ranks` (default: every rank), and its CFG-split halves.

    Collective over torch's default group: every rank of it must call this with the same
    arguments, in the same order as its other group creations (torch names groups by a counter
    that must agree across ranks). Returns None on ranks outside `ranks`.
    """
    if not dist.is_initialized():
        return single()
    everyone = dist.get_world_size()
    ranks = list(range(everyone)) if ranks is None else list(ranks)
    group = None if ranks == list(range(everyone)) else dist.new_group(ranks)
    size = len(ranks)
    halves = None
    if split_halves and size >= 2 and size % 2 == 0:
        half = size // 2
        if half == 1:
            halves = (None, None)
        else:
            halves = (dist.new_group(ranks[:half]), dist.new_group(ranks[half:]))
    me = dist.get_rank()
    if me not in ranks:
        return None
    return ParallelGroups(group, ranks.index(me), size, halves)
