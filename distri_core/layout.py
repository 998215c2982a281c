"""How one UNet call is divided: row bands per rank, batch chunks per rank group.

Pure arithmetic, no torch.distributed: the runtime asks for a plan, the layers read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BandPlan:
    """Latent rows per band. Every band spans a multiple of `unit` rows, so each band still starts
    on an even row after every downsample (a stride-2 conv then sees the same pixels it sees on
    one device)."""

    heights: tuple[int, ...]
    unit: int

    @property
    def total(self) -> int:
        return sum(self.heights)

    @property
    def parts(self) -> int:
        return len(self.heights)

    def rows(self, index: int) -> tuple[int, int]:
        start = sum(self.heights[:index])
        return start, start + self.heights[index]

    def scaled(self, index: int, own_size: int, own_index: int) -> int:
        """Size of band `index` at a resolution where band `own_index` has `own_size`.

        Every spatial size inside the UNet is proportional to the band height (width is never
        split), so sizes convert by the ratio of latent heights.
        """
        num = own_size * self.heights[index]
        den = self.heights[own_index]
        if num % den:
            raise RuntimeError(
                f"band {index} cannot be sized from band {own_index}: {own_size} x "
                f"{self.heights[index]} / {den} is not whole (inconsistent layer input)"
            )
        return num // den


def plan_bands(height: int, parts: int, unit: int, light: tuple[int, ...] = (),
               shares: tuple[float, ...] = ()) -> BandPlan:
    """Split `height` latent rows into `parts` bands, each a multiple of `unit` rows, as even as
    possible, or in proportion to `shares` (one per band, e.g. each device's relative speed, so a
    slower GPU gets fewer rows and every band finishes together; at least one block each). The
    units left over go to the first bands that are not `light` (bands whose device also serves
    the host), so a light band is never the larger one when others can take it."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} bands; use 1 or more")
    levels = unit.bit_length() - 1
    if height % unit:
        raise ValueError(
            f"latent height {height} is not a multiple of {unit}: this UNet halves the resolution "
            f"{levels} time(s), so every band must span a multiple of {unit} latent rows. Use an "
            f"image height that is a multiple of {unit} latent rows ({unit * 8} pixels with an "
            "8x VAE), e.g. crop or pad the latent"
        )
    blocks = height // unit
    if parts > blocks:
        raise ValueError(
            f"latent height {height} holds only {blocks} block(s) of {unit} rows (this UNet halves "
            f"the resolution {levels} time(s)), too few for {parts} bands; use at most {blocks} "
            "ranks for this size, or a taller image"
        )
    order = [i for i in range(parts) if i not in light] + [i for i in range(parts) if i in light]
    if shares:
        if len(shares) != parts or not all(s > 0 for s in shares):
            raise ValueError(f"shares={list(shares)} is not valid for {parts} bands; give one positive share per band")
        total = sum(shares)
        ideal = [blocks * s / total for s in shares]
        count = [max(1, int(v)) for v in ideal]
        while sum(count) > blocks:  # the minimum of one block each overshot: take from the largest
            count[max((i for i in range(parts) if count[i] > 1), key=lambda i: (count[i] - ideal[i], count[i]))] -= 1
        by_need = sorted(range(parts), key=lambda i: (-(ideal[i] - count[i]), order.index(i)))
        for i in by_need[:blocks - sum(count)]:
            count[i] += 1
        return BandPlan(tuple(c * unit for c in count), unit)
    base, extra = divmod(blocks, parts)
    bigger = set(order[:extra])
    return BandPlan(tuple((base + (1 if i in bigger else 0)) * unit for i in range(parts)), unit)


@dataclass(frozen=True)
class CallLayout:
    """Which ranks work on which batch chunk and band for one UNet call.

    groups[g] lists the world ranks (indices into the engine's world group) that share batch
    chunk g; within a group, the i-th rank computes band i of `bands`.
    """

    groups: tuple[tuple[int, ...], ...]
    chunks: tuple[tuple[int, int], ...]  # batch [start, stop) per group
    bands: BandPlan

    def locate(self, world_rank: int) -> tuple[int, int]:
        """(group index, band index) of a world rank."""
        for g, members in enumerate(self.groups):
            if world_rank in members:
                return g, members.index(world_rank)
        raise ValueError(f"rank {world_rank} is not part of this layout")


def make_layout(world_size: int, batch: int, height: int, unit: int, split_batch: bool,
                light: tuple[int, ...] = (), shares: tuple[float, ...] = ()) -> CallLayout:
    """Layout for a batch of `batch` images of `height` latent rows.

    With `split_batch` and an even batch, the ranks form two halves and each half takes one half
    of the batch (ComfyUI batches cond then uncond); otherwise all ranks share the whole batch.
    `light` ranks (sharing their GPU with the host) get the smaller band where bands differ.
    `shares` (one per rank, empty = even) sizes the bands in proportion.
    """
    if split_batch and world_size % 2 == 0 and batch % 2 == 0:
        half = world_size // 2
        groups = (tuple(range(half)), tuple(range(half, world_size)))
        chunks = ((0, batch // 2), (batch // 2, batch))
        # Both halves share one band plan: band i of each half has the same height, so a light
        # rank of either half marks its band index as light, and the slower of its two ranks
        # sets its share.
        light_bands = tuple(sorted({r % half for r in light}))
        band_shares = tuple(min(shares[i], shares[i + half]) for i in range(half)) if shares else ()
        return CallLayout(groups, chunks, plan_bands(height, half, unit, light_bands, band_shares))
    return CallLayout((tuple(range(world_size)),), ((0, batch),),
                      plan_bands(height, world_size, unit, light, shares))
