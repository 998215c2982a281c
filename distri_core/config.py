"""The patch-parallel configuration: a frozen, validated value with no side effects.

Process groups, devices and buffers are created by `distri_core.runtime`, never here, so a
config can be built, compared, hashed and cached (ComfyUI caches node outputs) freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Mode(str, enum.Enum):
    """How much of the displaced-patch approximation a run uses.

    `full_sync` blocks on every exchange and equals the single-device result up to float
    rounding; `naive_patch` never communicates inside the UNet (the quality floor and the speed
    ceiling). Four use one-step-stale conv halos and attention K/V after warm-up and differ
    only in how GroupNorm statistics are formed (`corrected_async_gn`, `sync_gn`, `stale_gn`,
    `separate_gn`). `corrected_extrapolated` is `corrected_async_gn` whose stale halos and K/V
    of the other bands are extrapolated from their last two versions along the model's timesteps
    (no extra traffic, about twice the stale memory; runtime.extrapolation). `auto` asks
    `distri_core.planner` to choose per sampling run (devices, CFG split, exact or displaced,
    warm-up); the engine only runs the concrete modes.
    """

    AUTO = "auto"
    FULL_SYNC = "full_sync"
    CORRECTED_ASYNC_GN = "corrected_async_gn"
    CORRECTED_EXTRAPOLATED = "corrected_extrapolated"
    SYNC_GN = "sync_gn"
    STALE_GN = "stale_gn"
    SEPARATE_GN = "separate_gn"
    NAIVE_PATCH = "naive_patch"

    @property
    def uses_stale(self) -> bool:
        """True when steps after warm-up read activations of the previous step."""
        return self not in (Mode.FULL_SYNC, Mode.NAIVE_PATCH)

    @property
    def communicates(self) -> bool:
        return self is not Mode.NAIVE_PATCH

    @property
    def gn_rule(self) -> Mode:
        """The mode whose GroupNorm rule this one uses (itself, but for `corrected_extrapolated`)."""
        return Mode.CORRECTED_ASYNC_GN if self is Mode.CORRECTED_EXTRAPOLATED else self

    @property
    def extrapolates(self) -> bool:
        """Displaced steps read the other bands' halos and K/V extrapolated, not as they were."""
        return self is Mode.CORRECTED_EXTRAPOLATED

    def flow_refusal(self, model: str) -> str | None:
        """Why this mode does not run on `model`, a flow-matching model (Flux), or None where it
        may: there the extrapolated activations lost (docs/bench/extrapolate.md)."""
        if not self.extrapolates:
            return None
        return (f"mode={self.value} does not suit {model}, a flow-matching model: there the extrapolated "
                "activations were 9-35% further from one device than corrected_async_gn's (docs/bench/extrapolate.md)")

    @property
    def concrete(self) -> bool:
        """A mode the engine can run (everything but `auto`, which the planner resolves)."""
        return self is not Mode.AUTO

    def __str__(self) -> str:
        return self.value


class CommDtype(str, enum.Enum):
    """The dtype activations travel in. `auto` keeps the model's own dtype."""

    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    def resolve(self, compute_dtype: torch.dtype) -> torch.dtype:
        return {
            CommDtype.AUTO: compute_dtype,
            CommDtype.FP32: torch.float32,
            CommDtype.FP16: torch.float16,
            CommDtype.BF16: torch.bfloat16,
        }[self]

    def __str__(self) -> str:
        return self.value


class Compile(str, enum.Enum):
    """How the workers run a stale key's band UNet after its warm-up (displaced steps).

    `off`: eager. `torch_compile`: TorchInductor compiles the computation between the layers'
    exchanges (the collectives stay outside the compiled graphs, in eager code), once per input
    shape (another stale key or sampling run reuses the graphs). `cuda_graphs`: the same graphs, captured as CUDA graphs (CUDA devices
    only). Synchronous steps always run eager.
    """

    OFF = "off"
    TORCH_COMPILE = "torch_compile"
    CUDA_GRAPHS = "cuda_graphs"

    def __str__(self) -> str:
        return self.value


def _coerce_enum(enum_type: type[enum.Enum], value: object, field_name: str) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise ValueError(f"{field_name}={value!r} is not valid; use one of: {choices}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PatchParallelConfig:
    """What a patch-parallel run should do.

    world_size:   number of ranks (one device each); any count from 1 up.
    mode:         see `Mode`; `corrected_async_gn` is DistriFusion's default.
    warmup_steps: synchronous steps after the first one, counted per conditioning key.
    cfg_split:    split a batch of even size (ComfyUI's [cond, uncond]) over two halves of the
                  ranks, each half patch-parallel. None = whenever the rank count is even,
                  True = require it (an odd rank count is an error), False = never.
    comm_dtype:   dtype for exchanged activations; `auto` = the model's dtype.
    devices:      optional device per rank ("cuda:0", "cpu", ...); empty = chosen by the runtime.
    host_device:  the GPU the host application itself computes on (ComfyUI's CLIP, VAE,
                  ControlNet, previews): a rank on it gets the smaller band (`light_ranks`).
    ranks:        which ranks of a larger worker pool take part (a plan that uses fewer devices
                  than the pool has); empty = ranks 0 .. world_size - 1. `devices` then lists
                  the devices of these ranks.
    compile:      see `Compile`; compiles the displaced steps' band UNet (off by default).
    band_shares:  relative rows per rank (e.g. each GPU's speed, so a slower one gets a smaller
                  band); empty = even bands. mode=auto sets it from the measured profile.
    """

    world_size: int = 1
    mode: Mode = Mode.CORRECTED_ASYNC_GN
    warmup_steps: int = 4
    cfg_split: bool | None = None
    comm_dtype: CommDtype = CommDtype.AUTO
    devices: tuple[str, ...] = field(default=())
    host_device: str | None = None
    ranks: tuple[int, ...] = field(default=())
    compile: Compile = Compile.OFF
    band_shares: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "mode", _coerce_enum(Mode, self.mode, "mode"))
        set_(self, "compile", _coerce_enum(Compile, self.compile, "compile"))
        set_(self, "comm_dtype", _coerce_enum(CommDtype, self.comm_dtype, "comm_dtype"))
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ValueError(
                f"world_size={self.world_size!r} is not valid; use a whole number of ranks, 1 or more"
            )
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(
                f"warmup_steps={self.warmup_steps!r} is not valid; use a whole number, 0 or more "
                "(DistriFusion uses 4 of 50 steps)"
            )
        if self.cfg_split is not None and not isinstance(self.cfg_split, bool):
            raise ValueError(f"cfg_split={self.cfg_split!r} is not valid; use True, False or None (auto)")
        if self.cfg_split is True and self.world_size % 2:
            raise ValueError(
                f"cfg_split=True needs an even number of ranks (one half per CFG branch), got "
                f"world_size={self.world_size}; use an even world_size, or cfg_split=None to split "
                "only when possible"
            )
        if self.mode is Mode.FULL_SYNC and self.comm_dtype is not CommDtype.AUTO:
            raise ValueError(
                f"comm_dtype={self.comm_dtype.value} with mode=full_sync: full_sync is the exact "
                "mode and must exchange activations in the model's own dtype; use comm_dtype='auto'"
            )
        devices = self.devices
        if isinstance(devices, str):
            devices = tuple(d.strip() for d in devices.split(",") if d.strip())
        devices = tuple(str(d) for d in devices)
        set_(self, "devices", devices)
        if devices:
            if len(devices) != self.world_size:
                raise ValueError(
                    f"devices={list(devices)} lists {len(devices)} device(s) for world_size="
                    f"{self.world_size}; give one device per rank or leave devices empty"
                )
            for d in devices:
                try:
                    torch.device(d)
                except RuntimeError:
                    raise ValueError(f"device {d!r} is not a torch device name; use e.g. 'cuda:0' or 'cpu'") from None
            gpus = [d for d in devices if torch.device(d).type != "cpu"]
            dup = sorted({d for d in gpus if gpus.count(d) > 1})
            if dup:
                raise ValueError(
                    f"device {dup[0]} is listed more than once; each rank needs a GPU of its own "
                    "(NCCL cannot run two ranks on one GPU); list distinct devices"
                )
            if self.compile is Compile.CUDA_GRAPHS and any(torch.device(d).type != "cuda" for d in devices):
                raise ValueError(
                    f"compile=cuda_graphs needs CUDA devices, got devices={list(devices)}; use "
                    "compile='torch_compile' (any device) or 'off'"
                )
        shares = tuple(self.band_shares)
        set_(self, "band_shares", shares)
        if shares and (len(shares) != self.world_size or
                       not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in shares)):
            raise ValueError(f"band_shares={list(shares)} is not valid for world_size={self.world_size}; give one "
                             "positive number per rank (relative rows), or leave it empty for even bands")
        ranks = tuple(self.ranks)
        set_(self, "ranks", ranks)
        if ranks:
            if len(ranks) != self.world_size or len(set(ranks)) != len(ranks) or \
                    not all(_is_int(r) and r >= 0 for r in ranks):
                raise ValueError(f"ranks={list(ranks)} is not valid for world_size={self.world_size}; list "
                                 f"{self.world_size} distinct pool ranks (0 or more), or leave it empty")
        if self.host_device is not None:
            try:
                set_(self, "host_device", str(torch.device(self.host_device)))
            except RuntimeError:
                raise ValueError(f"host_device={self.host_device!r} is not a torch device name; use e.g. "
                                 "'cuda:0', or None") from None

    @property
    def pool_ranks(self) -> tuple[int, ...]:
        """The worker-pool ranks this configuration runs on."""
        return self.ranks or tuple(range(self.world_size))

    @property
    def light_ranks(self) -> tuple[int, ...]:
        """Ranks whose GPU the host application uses too: they get the smaller band."""
        if self.host_device is None or torch.device(self.host_device).type == "cpu":
            return ()
        return tuple(r for r, d in enumerate(self.devices) if d == self.host_device)

    @property
    def split_cfg_possible(self) -> bool:
        """Whether an even batch is split over two rank halves (before looking at the batch)."""
        return self.cfg_split is not False and self.world_size % 2 == 0 and self.world_size >= 2

    def is_sync_call(self, call_index: int) -> bool:
        """Whether the `call_index`-th call (0-based) of one conditioning key runs synchronously."""
        if self.mode is Mode.AUTO:
            raise ValueError("mode=auto has no fixed schedule: distri_core.planner turns it into a concrete "
                             "configuration per sampling run")
        if self.mode is Mode.FULL_SYNC:
            return True
        if self.mode is Mode.NAIVE_PATCH:
            return False
        return call_index <= self.warmup_steps
