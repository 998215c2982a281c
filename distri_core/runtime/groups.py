"""Process groups for one engine: all its ranks, and the two halves used by CFG split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
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

    @property
    def my_half(self) -> object:
        """The CFG-split half this rank belongs to (None when there are none or it has one rank)."""
        if self.halves is None:
            return None
        return self.halves[self.rank // (self.size // 2)]


@dataclass(frozen=True)
class RankInfo:
    """What a task function receives first: its rank and size, its groups and device."""

    rank: int
    world: int
    groups: ParallelGroups  # the task's ranks (0..world-1) and their CFG-split halves
    device: str


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


def touch_groups(groups: ParallelGroups, device: torch.device) -> None:
    """One collective on the engine's group and on this rank's CFG half, checked.

    NCCL creates a communicator at its first collective, and needs the rendezvous store then;
    doing it here, before the worker says it is ready, turns a broken rendezvous or an NCCL
    set-up failure (P2P, shared memory, topology) into a start-up error instead of a hang in the
    middle of the first image."""
    checks = [(groups.group, groups.size)]
    if groups.my_half is not None:
        checks.append((groups.my_half, groups.size // 2))
    for group, size in checks:  # a one-rank world too: NCCL still builds (and checks) its communicator
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe, group=group)
        if int(probe.item()) != size:
            raise RuntimeError(f"process group check failed: all_reduce over {size} ranks gave {probe.item()}")
