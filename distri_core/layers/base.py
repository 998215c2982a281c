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
             keep=False (for exchanges that are never read stale). Where the exchange was
             `provide`d, the tensor's (shape, dtype) is enough.
    gather_start: the same, launched asynchronously; the returned function waits and gives the
             tensors (so a synchronous layer can compute what does not need them meanwhile).
    stale:   last call's tensors of every rank (waits for the pending gather that brings them),
             checked against this call's tensor or its (shape, dtype). A `StaleViews` list
             stays the same tensors from call to call (until the stale state is dropped): a
             layer may keep what it derives from them in its `memo`, and may write its fresh
             tensor into its own view in place.
    publish: hand over this call's tensor; it is sent asynchronously, overlapping later compute.
             None: it was written into its own view in place (nothing to copy).
    provide: every rank's tensor for the next gather of a name in this call, already known (it
             travelled inside an earlier gather): that gather sends nothing.
    provided: whether the next gather of a name has been provided so.
    """

    def gather(self, name: str, fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype], scaled_dim: int | None,
               keep: bool = True) -> list[torch.Tensor]: ...

    def gather_start(self, name: str, fresh: torch.Tensor, scaled_dim: int | None,
                     keep: bool = True) -> Callable[[], list[torch.Tensor]]: ...

    def stale(self, name: str, fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype],
              scaled_dim: int | None) -> list[torch.Tensor]: ...

    def publish(self, name: str, fresh: torch.Tensor | None) -> None: ...

    def provide(self, name: str, rows: torch.Tensor, fresh_shape: tuple[int, ...]) -> None: ...

    def provided(self, name: str) -> bool: ...


class StaleViews(list):
    """Every rank's tensor of one exchange, as views of the stale state (what `Exchanger.stale`
    returns when they never move). A layer may keep what it derives from them (slices, casts of
    constant shape) in `memo`, which lives and dies with the stale state, and may write this
    call's tensor into its own view."""

    def __init__(self, views):
        super().__init__(views)
        self.memo: dict = {}


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
    # Layers may write their fresh tensors into their own stale views (`DistriLayer.in_place`).
    # Off under compile=cuda_graphs: CUDA graph trees refuse to capture a graph that mutates an
    # input whose memory they do not own, so the write stays an eager copy between graphs there.
    write_in_place: bool = True

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

    # Its stale exchange holds activations, which `corrected_extrapolated` may predict from their
    # last two versions (runtime.extrapolation); GroupNorm's statistics may not.
    extrapolate = True

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

    def exchange(self, ctx: CallContext, fresh: torch.Tensor | tuple[tuple[int, ...], torch.dtype],
                 scaled_dim: int | None = None, tag: str = "") -> tuple[list[torch.Tensor], bool]:
        """Every rank's version of `fresh` and whether they are from this call.

        Synchronous calls gather this call's tensors (blocking). Otherwise the list holds the
        previous call's tensors of every rank (own included, so stale variants can use it): the
        caller must finish with them, then call `publish`. A displaced step needs only the fresh
        tensor's (shape, dtype), so a layer can write the tensor into its own view later.
        """
        name = self.name + tag
        if ctx.sync:
            return ctx.exchanger.gather(name, fresh, scaled_dim), True
        return ctx.exchanger.stale(name, fresh, scaled_dim), False

    @staticmethod
    def memo(views: list[torch.Tensor]) -> dict | None:
        """Where a layer may keep what it derives from stale views that do not move (see
        `Exchanger.stale`); None when they may move, and under torch.compile, which traces the
        plain path into its graph instead of guarding on Python-side caches."""
        memo = getattr(views, "memo", None)
        return None if memo is None or torch.compiler.is_compiling() else memo

    def memoized(self, views: list[torch.Tensor], key: str, make: Callable[[], object], keep: bool = True):
        """`make()`, kept in the views' `memo` under `key` (when there is one, and `keep`) and
        found there in later calls: for what a layer derives from stale views that do not move."""
        memo = self.memo(views)
        found = memo.get(key) if memo is not None else None
        if found is None:
            found = make()
            if memo is not None and keep:
                memo[key] = found
        return found

    @staticmethod
    def in_place(ctx: CallContext, views: list[torch.Tensor]) -> bool:
        """The stale views stay put (see `Exchanger.stale`): this call's tensor may be written into
        its own view and published as `None`, eagerly or inside a compiled graph (where the write
        joins the kernel that computes it, instead of a copy between graphs)."""
        return ctx.write_in_place and isinstance(views, StaleViews)

    def publish(self, ctx: CallContext, fresh: torch.Tensor | None, tag: str = "") -> None:
        """After an asynchronous `exchange`: send this call's tensor for the next call (None:
        it was written into this band's own stale view, see `in_place`)."""
        if not ctx.sync:
            ctx.exchanger.publish(self.name + tag, fresh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
