"""One rank of an n-band layout on one device, with no peers: what a rank computes in the
displaced steady state (its band, with every band's K/V in its attention), without what it sends.
The GPU check times it against one device on the whole latent: the compute-bound speedup ceiling.
"""

from __future__ import annotations

import torch

from ..config import PatchParallelConfig
from ..runtime.comm import StaleBuffers, _Bucket, _Done
from ..runtime.engine import DistriUNet
from ..runtime.groups import ParallelGroups


class SoloBuffers(StaleBuffers):
    """StaleBuffers without peers: in synchronous exchanges the other bands mirror this one (so
    every shape, buffer and kernel is a real rank's); asynchronous buckets are counted, not sent."""

    def _all_gather(self, rows: torch.Tensor):
        for j in range(self.world):
            if j != self.rank:
                rows[j].copy_(rows[self.rank])
        return _Done()

    def _launch(self, bucket: _Bucket) -> None:
        bucket.pending = None
        bucket.launched = True
        self.stats.add(bucket.rows.shape[1] * bucket.rows.element_size(), self.world - 1)


def solo_engine(model: torch.nn.Module, bands: int, rank: int | None = None,
                mode: str = "corrected_async_gn", compile: str = "off") -> DistriUNet:
    """The engine of rank `rank` (default: a middle band, halos on both sides) of `bands` ranks
    sharing the whole batch (no CFG split), warm-up 0: every call after the first is a
    displaced step."""
    rank = bands // 2 if rank is None else rank
    config = PatchParallelConfig(world_size=bands, mode=mode, warmup_steps=0, cfg_split=False, compile=compile)
    return DistriUNet(model, config, ParallelGroups(None, rank, bands, None), buffers=SoloBuffers)
