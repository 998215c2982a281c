"""The compute-bound ceiling on one device: the UNet on the whole latent against one rank's band
at 2, 4 and 8 bands (displaced steady state, whole-image K/V), timed with CUDA events; bytes a
rank sends per call, its stale memory and peak memory, and host syncs per call."""

from __future__ import annotations

import statistics
import warnings

import torch

from .. import zoo
from ..runtime.stats import Clock
from .solo import solo_engine


def inputs(model: str, batch: int, size: int, dtype: torch.dtype, device: torch.device, seed: int = 1):
    """A latent for a `size`-pixel square image, timesteps, text context and extra inputs."""
    g = torch.Generator().manual_seed(seed)
    h = size // 8
    context_dim = zoo.builtin_context_dim(model)
    x = torch.randn(batch, zoo.latent_channels(model), h, h, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    ctx = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
    extra = {k: v.to(dtype) for k, v in zoo.builtin_extra(model, batch, device).items()}
    return x, t, ctx, extra


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of fn (after the caller's warm-up), each on its own clock."""
    out = []
    for _ in range(repeats):
        clock = Clock(device)
        fn()
        out.append(clock.stop() * 1000.0)
    return out


def host_syncs(fn, device: torch.device) -> int | None:
    """Host-device synchronisations one call of fn makes (CUDA's sync debug mode), None off GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def band_ceiling(model_name: str = "sdxl", dtype: torch.dtype = torch.float16, batch: int = 2,
                 sizes=(1024, 2048, 4096), bands=(2, 4, 8), device: torch.device | str = "cuda:0",
                 repeats: int = 3, model: torch.nn.Module | None = None) -> list[dict]:
    """One row per (size, bands); bands 1 is the plain model on the whole latent."""
    device = torch.device(device)
    model = model if model is not None else zoo.build_builtin(model_name, dtype=dtype, device=device)
    rows = []
    for size in sizes:
        rows += _size_rows(model, inputs(model_name, batch, size, dtype, device), size, bands, device, repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _size_rows(model, args, size: int, bands, device: torch.device, repeats: int) -> list[dict]:
    x, t, ctx, extra = args
    with torch.inference_mode():
        def whole():
            return model(x, t, ctx, **extra)

        whole()
        base = statistics.median(timed(whole, device, repeats))
        rows = [{"size": size, "bands": 1, "ms": round(base, 2), "speedup_ceiling": 1.0,
                 "host_syncs_per_call": host_syncs(whole, device), "bytes_per_call": 0, "stale_mb": 0.0,
                 "peak_mb": _peak(device, whole)}]
        for n in bands:
            engine = solo_engine(model, n)

            def band(engine=engine):
                return engine.forward_band(x, t, ctx, **extra)

            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                band()  # the first call of a key: synchronous, registers the stale state
                band()
                before = engine.stats.bytes_sent
                ms = statistics.median(timed(band, device, repeats))
                sent = (engine.stats.bytes_sent - before) // repeats
                rows.append({"size": size, "bands": n, "ms": round(ms, 2), "speedup_ceiling": round(base / ms, 2),
                             "host_syncs_per_call": host_syncs(band, device), "bytes_per_call": sent,
                             "stale_mb": round(engine.stale_bytes / 2 ** 20, 1), "peak_mb": _peak(device, None)})
            finally:
                engine.close()
    return rows


def _peak(device: torch.device, fn) -> float | None:
    """Peak allocated MB (after running fn, when given, from a fresh peak)."""
    if device.type != "cuda":
        return None
    if fn is not None:
        torch.cuda.reset_peak_memory_stats(device)
        fn()
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def compile_rows(model_name: str = "sdxl", dtype: torch.dtype = torch.float16, batch: int = 2, sizes=(1024,),
                 bands: int = 2, device: torch.device | str = "cuda:0", repeats: int = 3,
                 settings=("off", "torch_compile", "cuda_graphs"), model: torch.nn.Module | None = None) -> list[dict]:
    """Patch Parallel Config's `compile` on one rank's displaced band: ms per call for each setting,
    the first displaced call's extra seconds (compiling), the graphs built, and the largest
    difference from the eager band's output."""
    import time

    device = torch.device(device)
    model = model if model is not None else zoo.build_builtin(model_name, dtype=dtype, device=device)
    rows = []
    for size in sizes:
        x, t, ctx, extra = inputs(model_name, batch, size, dtype, device)
        ref = None
        for setting in settings:
            if setting == "cuda_graphs" and device.type != "cuda":
                continue
            engine = solo_engine(model, bands, compile=setting)
            try:
                with torch.inference_mode():
                    def band(engine=engine, x=x, t=t, ctx=ctx, extra=extra):
                        return engine.forward_band(x, t, ctx, **extra).output

                    band()  # synchronous: registers the stale state
                    start = time.perf_counter()
                    out = band()  # the first displaced call (compiles)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    first_s = time.perf_counter() - start
                    band()
                    ms = statistics.median(timed(band, device, repeats))
                    out = band().float()
                    ref = out if ref is None else ref
                    rows.append({"size": size, "bands": bands, "compile": setting, "ms": round(ms, 2),
                                 "first_call_s": round(first_s, 2), "graphs": engine.compiled_graphs,
                                 "max_abs_diff_vs_off": float((out - ref).abs().max()),
                                 "host_syncs_per_call": host_syncs(band, device)})
            except Exception as e:  # noqa: BLE001 - a setting that fails is a result
                rows.append({"size": size, "bands": bands, "compile": setting, "error": f"{type(e).__name__}: {e}"[:500]})
            finally:
                engine.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
