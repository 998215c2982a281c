"""What a rank measures about its exchanges: bytes and collectives, and time spent waiting, timed
with CUDA events on a GPU (an NCCL wait returns at once on the host: the stream is what waits)
and with the host clock on a CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


class Clock:
    """Elapsed time of a span of work on `device`: CUDA events on a GPU (what the stream did,
    not when the host queued it), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since the clock started (waits for the device to get there)."""
        if not self.cuda:
            return time.perf_counter() - self.t0
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


@dataclass
class CommStats:
    """Bytes this rank delivered to the others (slot bytes x (peers)) and collectives issued."""

    bytes_sent: int = 0
    collectives: int = 0
    calls: int = 0
    wait_s: float = 0.0  # time blocked on communication (sync gathers and pending async ones)
    _spans: list = field(default_factory=list)  # CUDA event pairs not yet added to wait_s

    def add(self, slot_bytes: int, peers: int) -> None:
        self.bytes_sent += slot_bytes * peers
        self.collectives += 1

    def clock(self, device: torch.device) -> Clock:
        return Clock(device)

    @contextmanager
    def waiting(self, device: torch.device) -> Iterator[None]:
        """Count the time the work inside spends waiting for a collective. On a GPU it records two
        events on the current stream (no host sync); `settle()` adds them up later."""
        if device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self.wait_s += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._spans.append((start, end))

    def settle(self) -> None:
        """Add the recorded GPU waits to `wait_s` (after the call's work is done)."""
        if self._spans:
            self._spans[-1][1].synchronize()
            self.wait_s += sum(s.elapsed_time(e) for s, e in self._spans) / 1000.0
            self._spans.clear()

    def snapshot(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "collectives": self.collectives, "calls": self.calls,
                "wait_s": round(self.wait_s, 4)}
