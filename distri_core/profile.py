"""Per-call cost of the engine: operators dispatched and host time per UNet call, for the plain
UNet and for each mode's synchronous and displaced steps, and the operators that would make a GPU
host wait (see opcount). Run by `python -m distri_core.bench --profile` on the bench's ranks.

Two counts of the work a call hands the device (and `ops_per_layer`: the operators of one call
of each kind of distributed layer, for synchronous and displaced steps):
- `ops`: every operator dispatched, views included, counted below autograd (opcount.OpCounter);
  it cannot see inside a torch.compile'd graph;
- `dispatches`: what the profiler sees the host launch: operators called from Python or from a
  compiled graph's wrapper (their own sub-operators not counted again) and TorchInductor's
  generated kernels. It is the count that compares an eager call with a compiled one."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import zoo
from .config import Compile, PatchParallelConfig
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


_NAMESPACES = ("aten", "c10d", "_c10d_functional")


def _operator(name: str) -> bool:
    return name.split("::", 1)[0] in _NAMESPACES if "::" in name else False


def dispatched(call, settle=None) -> Counter:
    """What the host launches in one call (see the module's doc), by name; TorchInductor's
    generated kernels count under "<kernel>" (recorded when cpp.enable_kernel_profile is on).

    `settle()` (an engine's `drain`) runs after the call, still under the profiler but not
    counted: a collective launched while the profiler runs must finish before it stops (waiting
    on a gloo work that outlived its profiler crashed the process, now and then)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("distri.dispatched"):
            call()
        if settle is not None:
            settle()
    events = prof.events()
    # Only what the calling thread launches within the call: gloo runs a collective's copies on
    # threads of its own (NCCL on the device), and those are the collective's work, not launches
    # of the call.
    marker = next(e for e in events if e.name == "distri.dispatched")
    thread, start, end = marker.thread, marker.time_range.start, marker.time_range.end
    names: Counter = Counter()
    for event in events:
        if event.thread != thread or not start <= event.time_range.start <= end:
            continue
        if "cpp_fused" in event.name or event.name.startswith("triton_"):
            names["<kernel>"] += 1
        elif _operator(event.name) and not (event.cpu_parent is not None and _operator(event.cpu_parent.name)):
            names[event.name] += 1
    return names


def dispatches(call, settle=None) -> int:
    """Operators and generated kernels the host launches in one call (see `dispatched`)."""
    return sum(dispatched(call, settle).values())


@contextmanager
def ops_by_layer(layers) -> Iterator[dict[str, float]]:
    """Operators dispatched per call of each kind of distributed layer (`layers`: an engine's
    installed layers), averaged over the layers of a kind, for the calls made inside; the dict
    is filled on exit. It counts through each layer class's `__call__`, restored after."""
    classes = {type(layer) for layer in layers}
    saved = {cls: vars(cls).get("__call__") for cls in classes}
    ops: Counter = Counter()
    calls: Counter = Counter()
    result: dict[str, float] = {}

    inners = {cls: cls.__call__ for cls in classes}  # before any is replaced

    def counting(cls):
        inner = inners[cls]

        def call(self, *args, **kwargs):
            with OpCounter() as counter:
                out = inner(self, *args, **kwargs)
            ops[cls.__name__] += counter.total
            calls[cls.__name__] += 1
            return out
        return call

    for cls in classes:
        cls.__call__ = counting(cls)
    try:
        yield result
    finally:
        for cls, own in saved.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
        result.update({name: round(ops[name] / calls[name], 1) for name in sorted(calls)})


def _host_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def _measure(call, repeats: int = 3, settle=None) -> dict:
    """Operators and host-waiting operators of one call, its profiler dispatches, and the median
    host time of `repeats` (`settle`: see `dispatched`)."""
    with OpCounter() as counter:
        call()
    return {"ops": counter.total, "host_waits": dict(counter.host_waits), "dispatches": dispatches(call, settle),
            "ms": _host_ms(call, repeats)}


def profile_task(info, model: str, latent: int, modes: list[str], repeats: int = 3,
                 compiled: tuple[str, ...] = ()) -> dict | None:
    """Runs on every rank of a cluster; rank 0 returns the table. `compiled`: modes whose displaced
    steps are also measured with compile=torch_compile (dispatches and host time; the operator
    counter cannot see inside compiled graphs)."""
    if compiled:
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True  # the profiler then sees every generated kernel
    unet, plain, dim, extra = _model(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, dim, generator=g)
    t = torch.tensor([500.0])
    out = {"latent": latent, "ranks": info.world}
    kw = extra if model.startswith("builtin-") else {}  # what the engine's calls take beyond x, t, ctx
    with torch.inference_mode():
        plain(x, t, ctx)
        out["plain"] = _measure(lambda: plain(x, t, ctx), repeats)
        for mode in modes:
            config = PatchParallelConfig(world_size=info.world, mode=mode, warmup_steps=0, cfg_split=False)
            engine = DistriUNet(unet, config, info.groups)

            def step(sync, engine=engine):
                return engine.forward_band(x, t, ctx, sync=sync, **kw)

            step(True)  # the first call of the key registers its exchanges
            row = {"sync": _measure(lambda: step(True), repeats, engine.drain)}
            with ops_by_layer(engine.installed.layers) as per_layer:
                step(True)
            row["sync"]["ops_per_layer"] = per_layer
            if config.mode.uses_stale or mode == "naive_patch":
                # The first displaced calls of a key also make the views and indices later ones
                # reuse (two calls: corrected_extrapolated's two storages take turns, each with its
                # own): their host waits are counted (they would stall a GPU once per run), their
                # operators are not the steady state's.
                with OpCounter() as first:
                    step(False)
                    step(False)
                row["displaced"] = _measure(lambda: step(False), repeats, engine.drain)
                row["displaced"]["first_call_host_waits"] = dict(first.host_waits)
                with ops_by_layer(engine.installed.layers) as per_layer:
                    step(False)
                row["displaced"]["ops_per_layer"] = per_layer
            engine.close()
            for kind in ("sync", "displaced"):
                if kind in row:
                    row[kind]["ops_vs_plain"] = round(row[kind]["ops"] / out["plain"]["ops"], 2)
                    row[kind]["dispatches_vs_plain"] = round(row[kind]["dispatches"] / out["plain"]["dispatches"], 2)
            out[mode] = row
        for mode in compiled:
            out[f"{mode}+torch_compile"] = _compiled_row(info, unet, x, t, ctx, kw, mode, repeats,
                                                         out["plain"]["dispatches"])
    return out if info.rank == 0 else None


def _compiled_row(info, unet, x, t, ctx, kw: dict, mode: str, repeats: int, plain_dispatches: int) -> dict:
    """A displaced step of `mode` with compile=torch_compile, after the step that compiles it."""
    config = PatchParallelConfig(world_size=info.world, mode=mode, warmup_steps=0, cfg_split=False,
                                 compile=Compile.TORCH_COMPILE)
    engine = DistriUNet(unet, config, info.groups)
    try:
        engine.forward_band(x, t, ctx, sync=True, **kw)
        t0 = time.perf_counter()
        engine.forward_band(x, t, ctx, sync=False, **kw)  # compiles
        compile_s = time.perf_counter() - t0
        engine.forward_band(x, t, ctx, sync=False, **kw)
        n = dispatches(lambda: engine.forward_band(x, t, ctx, sync=False, **kw), engine.drain)
        ms = _host_ms(lambda: engine.forward_band(x, t, ctx, sync=False, **kw), repeats)
        return {"displaced": {"dispatches": n, "dispatches_vs_plain": round(n / plain_dispatches, 2), "ms": ms,
                              "compile_s": round(compile_s, 1), "compiled_graphs": engine.compiled_graphs}}
    finally:
        engine.close()
