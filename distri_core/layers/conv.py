"""Conv2d over a row band: the rows above and below the band (the halo) come from the
neighbouring bands, this step's (sync) or the previous step's (DistriFusion)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import CallContext, DistriLayer, LayerHost


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_halo(module: torch.nn.Conv2d) -> int:
    """Rows of context a conv needs above and below a band (0: it can run locally)."""
    kh, _ = _pair(module.kernel_size)
    dh, _ = _pair(module.dilation)
    if module.padding == "valid":
        return 0
    if module.padding == "same":
        span = dh * (kh - 1)
        if span % 2:
            raise ValueError(f"conv with padding='same' and an even kernel {module.kernel_size} pads "
                             "asymmetrically and cannot be split into row bands")
        return span // 2
    return _pair(module.padding)[0]


def check_conv(module: torch.nn.Conv2d) -> None:
    """Refuse convs whose row split would not be exact."""
    if module.padding_mode != "zeros" and conv_halo(module) > 0:
        raise ValueError(f"conv with padding_mode={module.padding_mode!r} cannot be split into row bands "
                         "exactly (only zero padding is supported)")
    sh, _ = _pair(module.stride)
    if sh not in (1, 2):
        raise ValueError(f"conv with stride {module.stride} is not supported in a row split (use 1 or 2)")


def halo_slot(x: torch.Tensor, p: int) -> torch.Tensor:
    """The rows a band shares with its neighbours: [first p rows | last p rows] (zero-filled
    where the band is shorter than p)."""
    h = x.shape[2]
    if h >= p:
        return torch.cat([x[:, :, :p], x[:, :, h - p:]], dim=2)
    slot = x.new_zeros(x.shape[0], x.shape[1], 2 * p, x.shape[3])
    slot[:, :, :h] = x
    slot[:, :, 2 * p - h:] = x
    return slot


def assemble_halo(views: list[torch.Tensor], heights: list[int], rank: int, p: int,
                  zeros: Callable[[tuple[int, ...], torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The p rows above and below band `rank`, from every band's halo slot; zeros past the image
    edge (the conv's own zero padding; `zeros(shape, like)` may give them, read only). Bands
    shorter than p are walked through."""
    ref = views[rank]

    def collect(order: range, take_last: bool) -> torch.Tensor:
        pieces, need = [], p
        for j in order:
            if need == 0:
                break
            k = min(need, heights[j], p)
            piece = views[j][:, :, 2 * p - k:] if take_last else views[j][:, :, :k]
            pieces.append(piece)
            need -= k
        if take_last:
            pieces.reverse()
        if need:
            shape = (ref.shape[0], ref.shape[1], need, ref.shape[3])
            pad = ref.new_zeros(shape) if zeros is None else zeros(shape, ref)
            pieces = [pad] + pieces if take_last else pieces + [pad]
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    above = collect(range(rank - 1, -1, -1), take_last=True)
    below = collect(range(rank + 1, len(views)), take_last=False)
    return above, below


class DistriConv2d(DistriLayer):
    """Installed as the forward of an `nn.Conv2d` with a kernel taller than one row."""

    def __init__(self, module: torch.nn.Conv2d, host: LayerHost, name: str, from_input: bool = False):
        check_conv(module)
        super().__init__(module, host, name)
        self.from_input = from_input  # the UNet's input convolution: halo rows from the input itself
        self.halo = conv_halo(module)
        self.stride_h = _pair(module.stride)[0]
        pw = _pair(module.padding)[1] if not isinstance(module.padding, str) else None
        if module.padding == "same":
            kw, dw = _pair(module.kernel_size)[1], _pair(module.dilation)[1]
            pw = dw * (kw - 1) // 2
        self.pad_w = pw or 0
        self._edge_index: dict = {}  # (band height, device) -> indices of the 2 * halo edge rows
        self._zeros: torch.Tensor | None = None  # the last rows past the image edge it used (read only)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.ctx
        if ctx is None or self.halo == 0 or not ctx.mode.communicates:
            # One band, or naive patches: the band is the image, the conv pads it with zeros.
            return self.original(x, *args, **kwargs)
        if self.from_input and ctx.input_halo is not None:
            # Exact in every mode, with no exchange: the rows come from this call's own input.
            above, below = ctx.input_halo
            if above.dtype != x.dtype:
                above, below = above.to(x.dtype), below.to(x.dtype)
            return self._conv(torch.cat([above, x, below], dim=2), (0, self.pad_w))
        if ctx.sync and self.stride_h == 1 and x.shape[2] > 2 * self.halo and not ctx.exchanger.provided(self.name):
            return self._overlapped(ctx, x)  # (a halo the GroupNorm carried is here already: nothing to overlap)
        x = self._with_halo(ctx, x)
        out = self._conv(x, (0, self.pad_w))
        expected = -(-(x.shape[2] - 2 * self.halo) // self.stride_h)
        if out.shape[2] != expected:
            raise RuntimeError(f"{self.name}: band of {x.shape[2] - 2 * self.halo} rows gave {out.shape[2]} "
                               f"output rows, expected {expected}; the band layout is not aligned to this conv")
        return out

    def _overlapped(self, ctx: CallContext, x: torch.Tensor) -> torch.Tensor:
        """A synchronous step, stride 1: the rows that need no halo are convolved while the halo
        exchange is in flight, then the p rows at each edge. Every output row sees exactly the
        input rows it would see in the padded band, so the result is the same."""
        p, h = self.halo, x.shape[2]
        finish = ctx.exchanger.gather_start(self.name, self._halo_slot(ctx, x), None)
        m = self.module
        with self.host.weights(m, x) as (w, b):
            def conv(rows: torch.Tensor) -> torch.Tensor:
                return F.conv2d(rows, w, b, m.stride, (0, self.pad_w), m.dilation, m.groups)

            interior = conv(x)  # output rows p .. h-p-1
            above, below = self._neighbours(ctx, finish(), x)
            top = conv(torch.cat([above, x[:, :, :2 * p]], dim=2))
            bottom = conv(torch.cat([x[:, :, h - 2 * p:], below], dim=2))
        return torch.cat([top, interior, bottom], dim=2)

    def edge_rows(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`halo_slot(x, halo)`: the rows this band shares with its neighbours, as one gather of
        the 2 * halo edge rows instead of two slices and a cat; into `out` where given (of any
        dtype: a cast where it is not x's)."""
        if x.shape[2] < self.halo or torch.compiler.is_compiling():
            rows = halo_slot(x, self.halo)
            return rows if out is None else out.copy_(rows)
        if out is None:
            return x.index_select(2, self._edge_index_for(x))
        if out.dtype != x.dtype:
            return out.copy_(x.index_select(2, self._edge_index_for(x)))
        return torch.index_select(x, 2, self._edge_index_for(x), out=out)

    def _edge_index_for(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of the 2 * halo edge rows of a band of x's height, made once per height and
        device, on the device (no host copy per call)."""
        p, h = self.halo, x.shape[2]
        index = self._edge_index.get((h, x.device))
        if index is None:
            index = torch.cat([torch.arange(p, device=x.device), torch.arange(h - p, h, device=x.device)])
            self._edge_index[(h, x.device)] = index
        return index

    def _zeros_like(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Zero rows past the image edge, reused while their shape, dtype and device stay (the cat
        reads them; nothing writes them); only the last ones are kept, so a change of resolution
        does not pile them up. Under compile, made in the graph."""
        if torch.compiler.is_compiling():
            return like.new_zeros(shape)
        zeros = self._zeros
        if zeros is None or zeros.shape != shape or zeros.dtype != like.dtype or zeros.device != like.device:
            zeros = self._zeros = like.new_zeros(shape)
        return zeros

    def slot_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of what a band of x sends its neighbours: its 2 * halo edge rows."""
        return (x.shape[0], x.shape[1], 2 * self.halo, x.shape[3])

    def _halo_slot(self, ctx: CallContext, x: torch.Tensor) -> torch.Tensor:
        """What this band sends its neighbours, in the exchange's dtype."""
        fresh = self.edge_rows(x)
        return fresh if ctx.comm_dtype is None or ctx.comm_dtype == fresh.dtype else fresh.to(ctx.comm_dtype)

    def _neighbours(self, ctx: CallContext, views: list[torch.Tensor], x: torch.Tensor):
        """The halo rows above and below this band, in x's dtype, from every band's slot."""
        heights = [ctx.bands.scaled(j, x.shape[2], ctx.rank) for j in range(ctx.bands.parts)]
        # Kept (one entry per exchange, whose shapes are fixed) where each side is one view of a
        # neighbour's slot (or zeros past the image edge), not a copy: it stays right from call to call.
        above, below = self.memoized(views, "halo", lambda: assemble_halo(views, heights, ctx.rank, self.halo, self._zeros_like),
                                     keep=min(heights) >= self.halo)
        if above.dtype != x.dtype:
            above, below = above.to(x.dtype), below.to(x.dtype)
        return above, below

    def _with_halo(self, ctx: CallContext, x: torch.Tensor) -> torch.Tensor:
        if ctx.sync:
            # A halo the GroupNorm carried needs only its slot's (shape, dtype): its rows are here.
            slot = ((self.slot_shape(x), ctx.comm_dtype or x.dtype)
                    if ctx.exchanger.provided(self.name) else self._halo_slot(ctx, x))
            views, _ = self.exchange(ctx, slot)
            above, below = self._neighbours(ctx, views, x)
            return torch.cat([above, x, below], dim=2)
        p, h = self.halo, x.shape[2]
        dtype = ctx.comm_dtype or x.dtype
        views, _ = self.exchange(ctx, (self.slot_shape(x), dtype))
        above, below = self._neighbours(ctx, views, x)
        padded = torch.cat([above, x, below], dim=2)
        # This band's edge rows go out only after the cat has read the neighbours' (the publish
        # may launch the gather that overwrites them; on a GPU the gather's stream waits for it).
        if not self.in_place(ctx, views):
            self.publish(ctx, self._halo_slot(ctx, x))
            return padded
        own = views[ctx.rank]
        if h >= p and dtype == x.dtype and not torch.compiler.is_compiling():
            torch.index_select(x, 2, self._edge_index_for(x), out=own)  # straight into the slot
        else:  # compiled: the compiler joins the write to the kernel that computes the rows
            own.copy_(self._halo_slot(ctx, x))
        self.publish(ctx, None)
        return padded

    def _conv(self, x: torch.Tensor, padding) -> torch.Tensor:
        m = self.module
        with self.host.weights(m, x) as (w, b):
            return F.conv2d(x, w, b, m.stride, padding, m.dilation, m.groups)
