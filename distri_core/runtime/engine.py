"""The displaced-patch-parallel UNet: one forward pass split into row bands over the ranks of a
process group, with stale state kept per (conditioning key, input shape, layout)."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..config import CommDtype, Compile, Mode, PatchParallelConfig
from ..layers.base import CallContext, LayerHost, WeightAccessor
from ..layout import CallLayout, make_layout
from ..surgery.adapters import adapter_for, chunk_batch
from ..surgery.walk import install_layers
from .comm import StaleBuffers, all_gather_rows, compiled_exchanges, run_eagerly
from .extrapolation import ExtrapolatingBuffers
from .groups import ParallelGroups, single
from .stats import CommStats

log = logging.getLogger("distri_core")


@dataclass
class _KeyState:
    buffers: StaleBuffers
    calls: int = 0
    band_weights: torch.Tensor | None = None  # each band's share of the rows, on the compute device


@dataclass
class BandCall:
    """This rank's share of one call before it runs: the layout, and the inputs cut to its batch
    chunk and row band."""

    key: Hashable  # the stale-state key
    layout: CallLayout
    group: int
    band: int
    chunk: tuple[int, int]
    rows: tuple[int, int]
    height: int
    dtype: torch.dtype
    sync: bool | None
    x: torch.Tensor
    timesteps: object
    context: object
    kwargs: dict
    input_halo: tuple[torch.Tensor, torch.Tensor] | None = None  # input rows above and below the band

    def to(self, device: torch.device, move) -> tuple[BandCall, int]:
        """The same call with its tensors moved by `move(value, device) -> (value, bytes)`."""
        moved_args, moved = move((self.x, self.timesteps, self.context, self.kwargs, self.input_halo), device)
        x, timesteps, context, kwargs, halo = moved_args
        return replace(self, x=x, timesteps=timesteps, context=context, kwargs=kwargs, input_halo=halo), moved


@dataclass
class BandResult:
    """This rank's share of one call: output rows [rows) of batch items [chunk)."""

    output: torch.Tensor
    layout: CallLayout
    chunk: tuple[int, int]
    rows: tuple[int, int]
    shape: tuple[int, ...] = field(default=())  # full output shape


def band_weights(heights: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Each band's share of the rows as a float32 device tensor, filled on the device (one fill
    per band: no host buffer is copied, so nothing waits for the device)."""
    total = sum(heights)
    weights = torch.empty(len(heights), dtype=torch.float32, device=device)
    for j, h in enumerate(heights):
        weights[j].fill_(h / total)
    return weights


class DistriUNet:
    """Runs `model` patch-parallel. Call it on every rank with the same full-size inputs.

    The engine takes ownership of `model`: it installs its layers on the model's modules (undone
    by `close()`); weights stay where they are and are read at call time through `weights`
    (default: the module's own parameters; ComfyUI callers pass `comfy.ops.cast_bias_weight`).
    """

    def __init__(self, model: nn.Module, config: PatchParallelConfig, groups: ParallelGroups | None = None,
                 *, weights: WeightAccessor | None = None, bucket_bytes: int = 8 << 20,
                 buffers: type[StaleBuffers] = StaleBuffers):
        groups = groups or single()
        if not config.mode.concrete:
            raise ValueError(f"mode={config.mode.value} cannot run as it is: plan it first "
                             "(distri_core.planner.plan_run gives a concrete configuration per sampling run)")
        if groups.size != config.world_size:
            raise ValueError(f"config.world_size={config.world_size} but the process group has {groups.size} "
                             "rank(s); build the config with the group's size")
        self.model = model
        self.config = config
        self.groups = groups
        self.adapter = adapter_for(model)
        refusal = config.mode.flow_refusal(type(model).__name__) if self.adapter.flow else None
        if refusal:
            raise ValueError(f"{refusal}; use mode='corrected_async_gn'")
        self.host = LayerHost(weights)
        self.installed = install_layers(model, self.host, self.adapter.input_conv(model),
                                        self.adapter.attention_namespace(model))
        self.installed.unit = max(self.installed.unit, self.adapter.min_unit(model))
        self.bucket_bytes = bucket_bytes
        self.buffers = buffers  # the exchange (runtime.comm); the GPU check swaps in one without peers
        self.stats = CommStats()
        self._keys: dict[Hashable, _KeyState] = {}
        self._compiled = None  # the displaced steps' forward under torch.compile (config.compile)
        # Layers write what they send into their own stale slots (see CallContext.write_in_place);
        # not under cuda_graphs, whose graph trees refuse graphs that mutate inputs they do not own.
        self.write_in_place = self.config.compile is not Compile.CUDA_GRAPHS
        self.compiled_graphs = 0  # graphs the compiler built so far (each recompile adds its graphs)

    @property
    def unit(self) -> int:
        """Band heights are multiples of this many latent rows."""
        return self.installed.unit

    def layout(self, batch: int, height: int) -> CallLayout:
        return make_layout(self.groups.size, batch, height, self.unit, self.config.split_cfg_possible,
                           self.config.light_ranks, self.config.band_shares)

    # -- calls ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, timesteps, context=None, *, key: Hashable = None,
                 sync: bool | None = None, **kwargs) -> torch.Tensor:
        """The full UNet output for the full input `x` [B, C, H, W] (every rank gets it)."""
        return self.assemble(self.forward_band(x, timesteps, context, key=key, sync=sync, **kwargs))

    def forward_band(self, x: torch.Tensor, timesteps, context=None, *, key: Hashable = None,
                     sync: bool | None = None, **kwargs) -> BandResult:
        """Compute this rank's band only. `key` names the conditioning (stale state is kept per
        key and input shape); `sync` forces (True) or skips (False) exact context for this call,
        default: the first call of a key plus `warmup_steps` more are exact."""
        return self.forward_prepared(self.prepare(x, timesteps, context, key=key, sync=sync, **kwargs))

    def prepare(self, x: torch.Tensor, timesteps, context=None, *, key: Hashable = None, sync: bool | None = None,
                **kwargs) -> BandCall:
        """This rank's share of a call, cut from the full inputs wherever they are (the pool's
        workers cut in host memory, so only the band moves to the GPU)."""
        if x.dim() != 4:
            raise ValueError(f"expected a latent [B, C, H, W], got shape {tuple(x.shape)}")
        self.adapter.check(kwargs)
        batch, _, height, _ = x.shape
        layout = self.layout(batch, height)
        g, band = layout.locate(self.groups.rank)
        chunk, rows = layout.chunks[g], layout.bands.rows(band)
        return BandCall(
            key=self._key(key, x, layout), layout=layout, group=g, band=band, chunk=chunk, rows=rows,
            height=height, dtype=x.dtype, sync=sync,
            x=x[chunk[0]:chunk[1], :, rows[0]:rows[1]],
            timesteps=chunk_batch(timesteps, chunk[0], chunk[1], batch),
            context=chunk_batch(context, chunk[0], chunk[1], batch),
            kwargs=self.adapter.cut(kwargs, chunk, batch, rows, height),
            input_halo=self._input_halo(x[chunk[0]:chunk[1]], rows))

    def _input_halo(self, x: torch.Tensor, rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The input rows just above and below band `rows` (zeros past the image edge)."""
        p = self.installed.input_halo
        if p == 0 or self.groups.size == 1:
            return None
        (r0, r1), h = rows, x.shape[2]

        def take(start: int, stop: int) -> torch.Tensor:
            part = x[:, :, max(start, 0):min(stop, h)]
            if part.shape[2] == p:
                return part
            pad = x.new_zeros(x.shape[0], x.shape[1], p - part.shape[2], x.shape[3])
            return torch.cat([pad, part] if start < 0 else [part, pad], dim=2)

        return take(r0 - p, r0), take(r1, r1 + p)

    def forward_prepared(self, call: BandCall) -> BandResult:
        """Run the band of a prepared call."""
        state = self._state(call)
        mode = self.config.mode
        if not mode.communicates:
            is_sync = False
        elif state.calls == 0 or mode is Mode.FULL_SYNC:
            is_sync = True  # no stale state yet, or the exact mode
        else:
            is_sync = call.sync if call.sync is not None else self.config.is_sync_call(state.calls)
        comm_dtype = None if self.config.comm_dtype is CommDtype.AUTO else self.config.comm_dtype.resolve(call.dtype)

        if state.band_weights is None or state.band_weights.device != call.x.device:
            state.band_weights = band_weights(call.layout.bands.heights, call.x.device)
        self.host.call = CallContext(mode, is_sync, call.band, call.layout.bands, state.buffers, comm_dtype,
                                     call.input_halo, state.band_weights, self.adapter.prefix_tokens(call.context),
                                     write_in_place=self.write_in_place)
        if isinstance(state.buffers, ExtrapolatingBuffers):
            state.buffers.observe(call.timesteps)
        state.buffers.begin_call()
        forward = self._forward
        if self.config.compile is not Compile.OFF and not is_sync and self.groups.size > 1:
            forward = self._compiled_forward(call.x.device)
        try:
            out = forward(call.x, call.timesteps, call.context, call.kwargs)
            state.buffers.end_call()
        except BaseException:
            # A failed call leaves this key's exchanges half done: forget the key (its buffers may
            # still be targets of gathers in flight, so they are dropped, not reused).
            self._keys.pop(call.key, None)
            raise
        finally:
            self.host.call = None
        state.calls += 1
        self.stats.calls += 1
        full_batch = call.layout.chunks[-1][1]
        return BandResult(out, call.layout, call.chunk, call.rows, (full_batch, out.shape[1], call.height, out.shape[3]))

    def _forward(self, x: torch.Tensor, timesteps, context, kwargs: dict) -> torch.Tensor:
        return self.adapter(self.model, x, timesteps, context, **kwargs)

    def _compiled_forward(self, device: torch.device):
        """`_forward` under torch.compile, built at the first displaced step. The layers' exchanges
        are marked `torch.compiler.disable` (runtime.comm): the compiler cuts its graphs there and
        the collectives run eagerly between them, as they do uncompiled, so a bucket's all-gather
        still overlaps the compiled compute after it. The graphs are specialised to the input
        shape: another shape compiles again; another stale key, or the same key in the next
        sampling run (new buffers), reuses them (tests/test_engine.py counts the graphs)."""
        if self._compiled is None:
            cuda_graphs = self.config.compile is Compile.CUDA_GRAPHS
            if cuda_graphs and device.type != "cuda":
                raise ValueError(f"compile=cuda_graphs needs a CUDA device, this rank computes on {device}; use "
                                 "compile='torch_compile' or 'off'")
            import torch._dynamo
            from torch._inductor.compile_fx import compile_fx

            compiled_exchanges()
            for namespace, name in self.adapter.eager_under_compile(self.model):
                run_eagerly(namespace, name)
            # Every distributed layer instance is a frame of its own between two exchanges, and each
            # input shape another specialisation: the default limit (8) would silently send most of
            # them back to eager.
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), 1024))
            if hasattr(config, "accumulated_recompile_limit"):
                config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1 << 16)
            patches = {"triton.cudagraphs": True} if cuda_graphs else {}

            def backend(graph, example_inputs):
                self.compiled_graphs += 1
                return compile_fx(graph, example_inputs, config_patches=patches)

            self._compiled = torch.compile(self._forward, backend=backend, dynamic=False)
        return self._compiled

    def assemble(self, part: BandResult) -> torch.Tensor:
        """All-gather every rank's band into the full output."""
        layout, shape = part.layout, part.shape
        if self.groups.size == 1:
            return part.output
        placement = []
        for r in range(self.groups.size):
            g, band = layout.locate(r)
            c0, c1 = layout.chunks[g]
            r0, r1 = layout.bands.rows(band)
            placement.append((c0, c1, r0, r1, (c1 - c0, shape[1], r1 - r0, shape[3])))
        slot = max(s[0] * s[1] * s[2] * s[3] for *_, s in placement)
        out = part.output
        rows = out.new_empty(self.groups.size, slot)
        rows[self.groups.rank, :out.numel()].copy_(out.reshape(-1))
        with self.stats.waiting(rows.device):
            all_gather_rows(rows, self.groups.rank, self.groups.group)
        self.stats.add(slot * rows.element_size(), self.groups.size - 1)
        full = out.new_empty(shape)
        for r, (c0, c1, r0, r1, s) in enumerate(placement):
            full[c0:c1, :, r0:r1] = rows[r, :s[0] * s[1] * s[2] * s[3]].view(s)
        return full

    # -- stale state ------------------------------------------------------------------------
    @staticmethod
    def _key(key: Hashable, x: torch.Tensor, layout: CallLayout) -> Hashable:
        return (key, tuple(x.shape), x.dtype, str(x.device), len(layout.groups))

    def _state(self, call: BandCall) -> _KeyState:
        state = self._keys.get(call.key)
        if state is None:
            if len(call.layout.groups) == 1:
                group = self.groups.group
            else:
                group = self.groups.halves[call.group]
            args = (group, call.band, call.layout.bands.parts, call.layout.bands, self.config.mode.uses_stale,
                    self.stats, self.bucket_bytes)
            if self.config.mode.extrapolates and self.buffers is StaleBuffers:
                buffers = ExtrapolatingBuffers(*args, extrapolated=frozenset(
                    layer.name for layer in self.installed.layers if layer.extrapolate))
            else:
                buffers = self.buffers(*args)
            state = self._keys[call.key] = _KeyState(buffers)
        return state

    @property
    def stale_bytes(self) -> int:
        """Memory held for stale activations (all keys)."""
        return sum(s.buffers.nbytes for s in self._keys.values())

    def drain(self) -> None:
        """Wait for every stale-state gather in flight (all keys); the state is kept."""
        for s in self._keys.values():
            s.buffers.drain()

    def reset(self) -> None:
        """Forget all stale state (call between sampling runs). Waits for gathers in flight."""
        for s in self._keys.values():
            s.buffers.close()
        self._keys.clear()

    def close(self) -> None:
        """Reset and give the model back as it was."""
        self.reset()
        self.installed.undo()
