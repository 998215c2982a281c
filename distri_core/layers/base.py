"""What every distributed layer shares: the wrapped module, the per-call context and the
exchange of activations with the other bands.

Layers are plain callables installed on a module of a model the engine owns (see
`distri_core.surgery`); the module keeps its type, its parameter names and its weights, so
weight patches (LoRA) made later still take effect: weights are read at call time through
`LayerHost.weights`.

The layers never import the runtime. The runtime fills `LayerHost.call` before each UNet call
with a `CallContext` whose `exchanger` follows the `Exchanger` protocol below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import Mode
from ..layout import BandPlan


class Exchanger(Protocol):
    """Moves one layer's activations between the ranks of a patch group (see runtime/comm.py).

    gather:  blocking all-gather of this call's tensors; kept as next call's stale state unless
             keep=False (for exchanges that are never read stale).
    gather_start: the same, launched asynchronously; the returned function waits and gives the
             tensors (so a synchronous layer can compute what does not need them meanwhile).
    stale:   last call's tensors of every rank (waits for the pending gather that brings them).
             The list may carry a `memo` dict: then its views stay the same tensors from call to
             call (until the stale state is dropped) and a layer may keep what it derives from
             them there, and may write its fresh tensor into its own view in place.
    publish: hand over this call's tensor; it is sent asynchronously, overlapping later compute.
             Publishing the own view written in place sends it without a copy.
    provide: every rank's tensor for the next gather of a name in this call, already known (it
             travelled inside an earlier gather): that gather sends nothing.
    """

    def gather(self, name: str, fresh: torch.Tensor, scaled_dim: int | None,
               keep: bool = True) -> list[torch.Tensor]: ...

    def gather_start(self, name: str, fresh: torch.Tensor, scaled_dim: int | None,
                     keep: bool = True) -> Callable[[], list[torch.Tensor]]: ...

    def stale(self, name: str, fresh: torch.Tensor, scaled_dim: int | None) -> list[torch.Tensor]: ...

    def publish(self, name: str, fresh: torch.Tensor) -> None: ...

    def provide(self, name: str, rows: torch.Tensor, fresh_shape: tuple[int, ...]) -> None: ...


@dataclass
class CallContext:
    """What one UNet call looks like from a layer: which band, synchronous or not."""

    mode: Mode
    sync: bool
    rank: int  # band index within the patch group
    bands: BandPlan
    exchanger: Exchanger | None
    comm_dtype: torch.dtype | None  # None: the activation's own dtype
    # The rows of this call's input latent just above and below the band (zeros past the image
    # edge), for the input convolution: every rank holds the whole current input.
    input_halo: tuple[torch.Tensor, torch.Tensor] | None = None
    # Each band's share of the image's rows, [parts] float32 on the compute device (made once per
    # layout, so GroupNorm's combination copies nothing from the host per call).
    band_weights: torch.Tensor | None = None
    # Tokens before the image tokens in a DiT's joint sequence (its text tokens), kept whole.
    prefix_tokens: int = 0

    @property
    def split(self) -> bool:
        """More than one band: the layers must do their distributed work."""
        return self.bands.parts > 1


WeightAccessor = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, Callable[[], None] | None]]


def plain_weights(module: torch.nn.Module, x: torch.Tensor):
    """The default weight accessor: the module's own parameters, in the input's dtype."""
    w = module.weight
    b = getattr(module, "bias", None)
    if w is not None and w.dtype != x.dtype:
        w = w.to(x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return w, b, None


class LayerHost:
    """Shared by all layers of one model: the current call and how to read weights.

    `weights(module, x)` must return (weight, bias, release) where release is None or a function
    called once the weights are no longer needed (ComfyUI's cast_bias_weight/uncast pair).
    """

    def __init__(self, weights: WeightAccessor | None = None):
        self.call: CallContext | None = None
        self.weight_accessor: WeightAccessor = weights or plain_weights

    @contextmanager
    def weights(self, module: torch.nn.Module, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        w, b, release = self.weight_accessor(module, x)
        try:
            yield w, b
        finally:
            if release is not None:
                release()


class DistriLayer:
    """Base of the distributed layers: owns the wrapped module, its exchange name and the
    sync / stale logic every layer needs."""

    def __init__(self, module: torch.nn.Module, host: LayerHost, name: str):
        self.module = module
        self.host = host
        self.name = name
        # The module's own forward (the class's), for calls that need no distributed work.
        self.original = type(module).forward.__get__(module)

    @property
    def ctx(self) -> CallContext | None:
        """The current call, or None outside a patch-parallel call (then run the plain module)."""
        call = self.host.call
        return call if call is not None and call.split else None

    def exchange(self, ctx: CallContext, fresh: torch.Tensor, scaled_dim: int | None = None,
                 tag: str = "") -> tuple[list[torch.Tensor], bool]:
        """Every rank's version of `fresh` and whether they are from this call.

        Synchronous calls gather this call's tensors (blocking). Otherwise the list holds the
        previous call's tensors of every rank (own included, so stale variants can use it): the
        caller must finish with them, then call `publish`.
        """
        name = self.name + tag
        if ctx.sync:
            return ctx.exchanger.gather(name, fresh, scaled_dim), True
        return ctx.exchanger.stale(name, fresh, scaled_dim), False

    def shape_probe(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A meta tensor of this shape and dtype (made once per shape): what a displaced
        exchange checks its stale state against, when the fresh tensor is not built before it."""
        probes = self.__dict__.setdefault("_probes", {})
        probe = probes.get((shape, dtype))
        if probe is None:
            probe = probes[(shape, dtype)] = torch.empty(shape, dtype=dtype, device="meta")
        return probe

    @staticmethod
    def memo(views: list[torch.Tensor]) -> dict | None:
        """Where a layer may keep what it derives from stale views that do not move (see
        `Exchanger.stale`); None when they may move, and under torch.compile, which traces the
        plain path into its graph instead of guarding on Python-side caches."""
        memo = getattr(views, "memo", None)
        return None if memo is None or torch.compiler.is_compiling() else memo

    def publish(self, ctx: CallContext, fresh: torch.Tensor, tag: str = "") -> None:
        """After an asynchronous `exchange`: send this call's tensor for the next call."""
        if not ctx.sync:
            ctx.exchanger.publish(self.name + tag, fresh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
