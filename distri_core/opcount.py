"""What one UNet call asks of the device: every operator dispatched (counted with a
TorchDispatchMode, below autograd, so every kernel launch and view is one entry), and the ones that
make the host wait for the device or copy host data to it (an item(), a tensor built from Python
data, a copy between devices, ops whose output size depends on device values)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that read a device value back or whose output size depends on device data.
_WAITING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero",
            "lift_fresh", "lift_fresh_copy"}


class OpCounter(TorchDispatchMode):
    """with OpCounter() as c: ...; c.total, c.ops (name -> count), c.host_waits (name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_waits: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in _WAITING or (name == "repeat_interleave" and "output_size" not in kwargs
                                 and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point()):
            self.host_waits[name] += 1
        elif name in ("_to_copy", "copy_") and self._crosses_devices(name, args, kwargs):
            self.host_waits[f"{name} (across devices)"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _crosses_devices(name: str, args, kwargs) -> bool:
        src = args[1] if name == "copy_" else args[0]
        dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
        return isinstance(src, torch.Tensor) and torch.device(dst) != src.device

    @property
    def total(self) -> int:
        return sum(self.ops.values())
