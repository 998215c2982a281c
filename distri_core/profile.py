"""Per-call cost of the engine: operators dispatched and host time per UNet call, for the plain
UNet and for each mode's synchronous and displaced steps, and the operators that would make a GPU
host wait (see opcount). Run by `python -m distri_core.bench --profile` on the bench's ranks."""

from __future__ import annotations

import statistics
import time

import torch

from . import zoo
from .config import PatchParallelConfig
from .opcount import OpCounter
from .runtime.engine import DistriUNet


def _model(name: str):
    """(module, call(x, t, ctx)) of a bench model: diffusers' sizes, or 'builtin-<shape>'."""
    if name.startswith("builtin-"):
        shape = name.removeprefix("builtin-")
        unet = zoo.build_builtin(shape)
        extra = zoo.builtin_extra(shape, 1)
        dim = zoo.builtin_context_dim(shape)
        return unet, (lambda x, t, c: unet(x, t, c, **extra)), dim, extra
    unet = zoo.build(name)
    extra = zoo.extra_inputs(name, 1, 0, 0)
    dim = zoo.CONFIGS[name]["cross_attention_dim"]
    return unet, (lambda x, t, c: unet(x, t, encoder_hidden_states=c, return_dict=False, **extra)[0]), dim, extra


def _measure(call, repeats: int = 3) -> dict:
    """Operators and host-waiting operators of one call, and the median host time of `repeats`."""
    with OpCounter() as counter:
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"ops": counter.total, "host_waits": dict(counter.host_waits), "ms": round(statistics.median(times) * 1e3, 2)}


def profile_task(info, model: str, latent: int, modes: list[str], repeats: int = 3) -> dict | None:
    """Runs on every rank of a cluster; rank 0 returns the table."""
    unet, plain, dim, extra = _model(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, dim, generator=g)
    t = torch.tensor([500.0])
    out = {"latent": latent, "ranks": info.world}
    with torch.inference_mode():
        plain(x, t, ctx)
        out["plain"] = _measure(lambda: plain(x, t, ctx), repeats)
        for mode in modes:
            config = PatchParallelConfig(world_size=info.world, mode=mode, warmup_steps=0, cfg_split=False)
            engine = DistriUNet(unet, config, info.groups)
            kw = extra if model.startswith("builtin-") else {}

            def step(sync, engine=engine, kw=kw):
                return engine.forward_band(x, t, ctx, sync=sync, **kw)

            step(True)  # the first call of the key registers its exchanges
            row = {"sync": _measure(lambda: step(True), repeats)}
            if config.mode.uses_stale or mode == "naive_patch":
                # The first displaced call of a key also makes the views and indices later ones
                # reuse: its host waits are counted (they would stall a GPU once per run), its
                # operators are not the steady state's.
                with OpCounter() as first:
                    step(False)
                row["displaced"] = _measure(lambda: step(False), repeats)
                row["displaced"]["first_call_host_waits"] = dict(first.host_waits)
            engine.close()
            for kind in ("sync", "displaced"):
                if kind in row:
                    row[kind]["ops_vs_plain"] = round(row[kind]["ops"] / out["plain"]["ops"], 2)
            out[mode] = row
    return out if info.rank == 0 else None
