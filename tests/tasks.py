"""Functions the tests run on every rank of the gloo cluster (module level, so they pickle).

Each builds the same random-weight model on every rank (deterministic seeds), runs it
patch-parallel, and on rank 0 also runs it on one device for reference.
"""

from __future__ import annotations

import torch

from distri_core import PatchParallelConfig
from distri_core.runtime.engine import DistriUNet
from distri_core.sampling import ddim_sample


def build(family: str, kind: str, comfy_path: str | None = None, **overrides):
    """(UNet module, plain single-device call, weight accessor) for a model family (`overrides`:
    changes to a ComfyUI model's UNet config)."""
    if family == "diffusers":
        from distri_core import zoo

        unet = zoo.build(kind)

        def plain(x, t, ctx, **kw):
            return unet(x, t, encoder_hidden_states=ctx, return_dict=False, **kw)[0]

        return unet, plain, None
    if family == "builtin":
        from distri_core import zoo

        unet = zoo.build_builtin(kind)

        def plain(x, t, ctx, **kw):
            return unet(x, t, ctx, **kw)

        return unet, plain, None
    import comfy_models

    comfy_models.setup(comfy_path)
    unet = comfy_models.build(kind, **overrides).diffusion_model

    def plain(x, t, ctx, **kw):
        return unet(x, t, ctx, **kw)

    return unet, plain, comfy_models.comfy_weights()


def inputs(family: str, kind: str, batch: int, height: int, width: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    channels = 16 if "flux" in kind else 4
    x = torch.randn(batch, channels, height, width, generator=g)
    t = torch.full((batch,), 0.7 if kind == "flux" else 500.0)
    if family == "diffusers":
        from distri_core import zoo

        dim = zoo.CONFIGS[kind]["cross_attention_dim"]
    elif family == "builtin":
        from distri_core import zoo

        dim = zoo.builtin_context_dim(kind)
    else:
        import comfy_models

        dim = comfy_models.CONTEXT_DIM.get(kind) or comfy_models.TINY[kind]["context_dim"]
    ctx = torch.randn(batch, 7, dim, generator=g)
    kw = {}
    if family == "comfy" and kind == "sdxl":
        kw["y"] = torch.randn(batch, 2816, generator=g)
    if family == "builtin":
        from distri_core import zoo

        kw.update({k: torch.randn(v.shape, generator=g) if k == "y" else v
                   for k, v in zoo.builtin_extra(kind, batch).items()})
    if family == "comfy" and kind == "flux":
        kw["y"] = torch.randn(batch, 32, generator=g)
        kw["guidance"] = torch.full((batch,), 3.5)
    return x, t, ctx, kw


def _engine(info, unet, accessor, **cfg):
    config = PatchParallelConfig(world_size=info.world, **cfg)
    return DistriUNet(unet, config, info.groups, weights=accessor)


def call_errors(info, family, kind, batch, height, width, calls=3, comfy_path=None, extra=None, **cfg):
    """Max |parallel - single| of `calls` consecutive calls whose input drifts slightly."""
    unet, plain, accessor = build(family, kind, comfy_path)
    x, t, ctx, kw = inputs(family, kind, batch, height, width)
    kw.update(extra or {})
    seq = [(x * (1 - 0.02 * i), t - 10 * i) for i in range(calls)]
    with torch.inference_mode():
        refs = [plain(xi, ti, ctx, **_fresh(kw)) for xi, ti in seq] if info.rank == 0 else None
        engine = _engine(info, unet, accessor, **cfg)
        outs = [engine(xi, ti, ctx, **_fresh(kw)) for xi, ti in seq]
        stats = engine.stats.snapshot()
        engine.close()
    if info.rank:
        return None
    scale = max(float(r.abs().max()) for r in refs)
    return {"errors": [float((o - r).abs().max()) for o, r in zip(outs, refs, strict=True)], "scale": scale, "stats": stats}


def _fresh(kw: dict) -> dict:
    """ComfyUI's UNet pops control lists: every call gets its own copy."""
    out = dict(kw)
    if "control" in out:
        out["control"] = {k: list(v) for k, v in out["control"].items()}
    return out


def denoise(info, family, kind, batch, height, width, steps, modes, warmup=2, guidance=1.0, comfy_path=None, **cfg):
    """Final latents of a DDIM loop: single device on rank 0, then each mode on all ranks.
    Returns {mode: (max abs error, mean abs error)} and the reference scale (rank 0)."""
    unet, plain, accessor = build(family, kind, comfy_path)
    x, _, ctx, kw = inputs(family, kind, 1, height, width, seed=11)
    ctx = torch.cat([ctx, torch.zeros_like(ctx)]) if guidance != 1.0 else ctx

    def eps_fn(call):
        def fn(xt, t, i):
            xx = torch.cat([xt, xt]) if guidance != 1.0 else xt
            out = call(xx, torch.full((xx.shape[0],), float(t)), ctx)
            if guidance == 1.0:
                return out
            c, u = out.chunk(2)
            return u + guidance * (c - u)
        return fn

    result = {}
    with torch.inference_mode():
        ref = ddim_sample(eps_fn(lambda a, b, c: plain(a, b, c, **kw)), x, steps) if info.rank == 0 else None
        for mode in modes:
            engine = _engine(info, unet, accessor, mode=mode, warmup_steps=warmup, **cfg)
            out = ddim_sample(eps_fn(lambda a, b, c, engine=engine: engine(a, b, c, **kw)), x, steps)
            engine.close()
            if info.rank == 0:
                d = (out - ref).abs()
                result[mode] = (float(d.max()), float(d.mean()))
    if info.rank:
        return None
    return {"errors": result, "scale": float(ref.abs().mean())}


def keyed_calls(info, family, kind, height, width, warmup, comfy_path=None):
    """cond and uncond as separate, interleaved calls with their own keys (as ComfyUI may send
    them). Returns per-call errors in call order: (key, step, error)."""
    unet, plain, accessor = build(family, kind, comfy_path)
    x, t, ctx, kw = inputs(family, kind, 2, height, width)
    conds = {"cond": (ctx[:1], {k: v[:1] for k, v in kw.items()}), "uncond": (ctx[1:], {k: v[1:] for k, v in kw.items()})}
    out = []
    with torch.inference_mode():
        engine = _engine(info, unet, accessor, mode="corrected_async_gn", warmup_steps=warmup)
        for step in range(warmup + 3):
            xi, ti = x[:1] * (1 - 0.02 * step), t[:1] - 10 * step
            for key, (c, k) in conds.items():
                got = engine(xi, ti, c, key=key, **k)
                if info.rank == 0:
                    out.append((key, step, float((got - plain(xi, ti, c, **k)).abs().max())))
        engine.close()
    return out if info.rank == 0 else None


def expect_error(info, family, kind, batch, height, width, extra=None, comfy_path=None, **cfg):
    """Run one call that must fail; return (exception type name, message) on every rank."""
    unet, _, accessor = build(family, kind, comfy_path)
    x, t, ctx, kw = inputs(family, kind, batch, height, width)
    kw.update(extra or {})
    try:
        engine = _engine(info, unet, accessor, **cfg)
        with torch.inference_mode():
            engine(x, t, ctx, **kw)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return type(e).__name__, str(e)
    return None


def identity_attn1_patch(n, context, value, extra_options):
    """A ComfyUI attn1_patch (as IPAdapter-style packs install) that changes nothing."""
    return n, context, value


def group_sum(info):
    """An all-reduce over the task's own group: a sub-world's group is created after the workers
    said they were ready, as NCCL creates its communicators lazily at first use."""
    import torch.distributed as dist

    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t, group=info.groups.group)
    return float(t)


def stale_memory(info, bucket_bytes: int):
    """Stale state of one key after its first (register) call and two more: (peak bytes held at
    once during the first call, bytes held after it, bucket count)."""
    from distri_core import zoo

    unet = zoo.build("micro")
    x, t, ctx, _ = inputs("diffusers", "micro", 1, 48, 40)
    config = PatchParallelConfig(world_size=info.world, mode="corrected_async_gn", warmup_steps=0)
    engine = DistriUNet(unet, config, info.groups, bucket_bytes=bucket_bytes)
    with torch.inference_mode():
        for i in range(3):
            engine(x * (1 - 0.01 * i), t, ctx)
    (state,) = engine._keys.values()
    result = (state.buffers.peak_bytes, state.buffers.nbytes, len(state.buffers.buckets))
    engine.close()
    return result


def attention_calls(info, comfy_path: str):
    """SD2.x (attention in float32 precision) full_sync on the task's ranks, with ComfyUI's own
    attention function recorded: (query tokens, key tokens, attn_precision) of each call on this
    rank, and the max error against one device (rank 0)."""
    import comfy_models

    comfy_models.setup(comfy_path)
    import comfy.ldm.modules.attention as attention

    calls = []
    real = attention.optimized_attention

    def recording(q, k, v, heads, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], str(kwargs.get("attn_precision"))))
        return real(q, k, v, heads, *args, **kwargs)

    attention.optimized_attention = recording
    try:
        result = call_errors(info, "comfy", "sd2", 1, 32, 24, 1, comfy_path=comfy_path, mode="full_sync")
    finally:
        attention.optimized_attention = real
    return calls, result


def solo_vs_real(info):
    """A real rank and the GPU check's peerless rank (SoloBuffers) over three calls of the
    displaced mode: (band output shape, stale bytes, bytes sent, collectives) of each."""
    from distri_core import zoo
    from distri_core.gpucheck.solo import solo_engine

    unet = zoo.build_builtin("tiny")
    x, t, ctx, kw = inputs("builtin", "tiny", 2, 32, 24)
    config = PatchParallelConfig(world_size=info.world, mode="corrected_async_gn", warmup_steps=0, cfg_split=False)
    out = []
    with torch.inference_mode():
        for make in (lambda: DistriUNet(unet, config, info.groups), lambda: solo_engine(unet, info.world, info.rank)):
            engine = make()  # one engine at a time owns the model's layers
            for i in range(3):
                part = engine.forward_band(x * (1 - 0.01 * i), t, ctx, **kw)
            out.append((tuple(part.output.shape), engine.stale_bytes, engine.stats.bytes_sent, engine.stats.collectives))
            engine.close()
    return out


def input_conv_errors(info, family, kind, height, width, modes, comfy_path=None):
    """Per mode, the max error of this rank's rows of the input convolution's output against one
    device, at each of three calls (warm-up 0: the second and third are displaced steps)."""
    unet, plain, accessor = build(family, kind, comfy_path)
    from distri_core.surgery.adapters import adapter_for

    conv = adapter_for(unet).input_conv(unet)
    seen = []
    conv.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    x, t, ctx, kw = inputs(family, kind, 1, height, width)
    seq = [(x * (1 - 0.1 * i) + 0.3 * i, t - 10 * i) for i in range(3)]
    with torch.inference_mode():
        for xi, ti in seq:
            plain(xi, ti, ctx, **_fresh(kw))
        full = list(seen)
        result = {}
        for mode in modes:
            seen.clear()
            engine = _engine(info, unet, accessor, mode=mode, warmup_steps=0)
            rows = []
            for xi, ti in seq:
                part = engine.forward_band(xi, ti, ctx, **_fresh(kw))
                rows.append(part.rows)
            engine.close()
            result[mode] = [float((band - f[:, :, r0:r1]).abs().max()) for band, f, (r0, r1) in zip(seen, full, rows,
                                                                                                    strict=True)]
    return result


def sync_collectives(info, family, kind, comfy_path=None):
    """Blocking collectives of one synchronous call, next to the exchanging layers: (collectives,
    layers that exchange in a sync call, GroupNorms that carry their conv's halo)."""
    from distri_core.layers.attention import DistriKV
    from distri_core.layers.conv import DistriConv2d
    from distri_core.layers.groupnorm import DistriGroupNorm

    unet, plain, accessor = build(family, kind, comfy_path)
    x, t, ctx, kw = inputs(family, kind, 1, 48, 32)
    with torch.inference_mode():
        engine = _engine(info, unet, accessor, mode="full_sync")
        engine.forward_band(x, t, ctx, **_fresh(kw))
        layers = engine.installed.layers
        exchanging = sum(1 for layer in layers if isinstance(layer, (DistriGroupNorm, DistriKV))
                         or (isinstance(layer, DistriConv2d) and not layer.from_input))
        carriers = sum(1 for layer in layers if isinstance(layer, DistriGroupNorm) and layer.feeds is not None)
        result = (engine.stats.collectives, exchanging, carriers)
        engine.close()
    return result


def unchanged_input_errors(info, family, kind, height, width, modes, comfy_path=None):
    """Per mode, the max error against one device of displaced calls whose input does not change:
    the previous step's activations are then this step's, so every displaced mode must be exact
    (a misplaced stale buffer, a wrong rank order or offset shows here)."""
    unet, plain, accessor = build(family, kind, comfy_path)
    x, t, ctx, kw = inputs(family, kind, 1, height, width)
    out = {}
    with torch.inference_mode():
        ref = plain(x, t, ctx, **_fresh(kw))
        for mode in modes:
            engine = _engine(info, unet, accessor, mode=mode, warmup_steps=0)
            results = [engine(x, t, ctx, **_fresh(kw)) for _ in range(3)]  # sync, then displaced twice
            engine.close()
            out[mode] = [float((r - ref).abs().max()) for r in results]
    return out if info.rank == 0 else None


def copied_vs_in_place(info, family, kind, height, width, mode="corrected_async_gn", comfy_path=None):
    """Per call, max |copied - in place| between an engine whose layers write what they send into
    their stale slots (the default) and one whose layers hand over a fresh tensor that the exchange
    copies (what they do under compile=cuda_graphs on a GPU, see CallContext.write_in_place)."""
    unet, _, accessor = build(family, kind, comfy_path)
    x, t, ctx, kw = inputs(family, kind, 1, height, width)
    seq = [(x * (1 - 0.02 * i), t - 10 * i) for i in range(4)]
    outs = []
    with torch.inference_mode():
        for in_place in (True, False):
            engine = _engine(info, unet, accessor, mode=mode, warmup_steps=0)
            engine.write_in_place = in_place
            outs.append([engine(xi, ti, ctx, **_fresh(kw)) for xi, ti in seq])
            engine.close()
    return [float((a - b).abs().max()) for a, b in zip(*outs, strict=True)] if info.rank == 0 else None


def compiled_calls(info, family, kind, height, width, mode="corrected_async_gn", comfy_path=None):
    """The same displaced calls through an eager and a compiled (TorchInductor) engine: per call,
    max |compiled - eager| and the compiled engine's graph count after it. Calls: key "a" (the
    first synchronous, then displaced), then key "b", key "a" again, and, after a reset (a new
    sampling run), key "a" again. (A call of another input shape compiles once more: measured,
    not tested here, as it doubles the test's compile time.) Also what the host launches in a
    plain UNet call and in one compiled displaced call (profile.dispatched), by name."""
    import torch._inductor.config as inductor

    from distri_core.profile import dispatched

    inductor.cpp.enable_kernel_profile = True  # the profiler then sees each generated kernel
    # Two resolution levels instead of three: every kind of layer and block is still there (input
    # conv, ResBlocks with their GroupNorm-conv halves, attention, down- and upsampling), with
    # fewer graphs to compile (CI compiles them cold).
    levels = dict(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                  transformer_depth_output=[1, 1, 1, 1]) if family == "comfy" else {}
    unet, plain, accessor = build(family, kind, comfy_path, **levels)
    x, t, ctx, kw = inputs(family, kind, 1, height, width)
    calls = [("a", i) for i in range(4)] + [("b", i) for i in range(3)] + [("a", 4), ("a", 5)]
    results = []
    with torch.inference_mode():
        eager = _engine(info, unet, accessor, mode=mode, warmup_steps=0)
        outs = [eager(x * (1 - 0.02 * i), t - 10 * i, ctx, key=k, **_fresh(kw)) for k, i in calls]
        eager.close()
        engine = _engine(info, unet, accessor, mode=mode, warmup_steps=0, compile="torch_compile")
        for run in (calls, calls[:3]):  # the second run after a reset: every key's stale buffers are new
            for (k, i), ref in zip(run, outs, strict=False):
                out = engine(x * (1 - 0.02 * i), t - 10 * i, ctx, key=k, **_fresh(kw))
                results.append((k, i, float((out - ref).abs().max()), float(ref.abs().max()), engine.compiled_graphs))
            engine.reset()
        for k, i in calls[:2]:  # key "a": synchronous, then displaced (compiled)
            engine(x * (1 - 0.02 * i), t - 10 * i, ctx, key=k, **_fresh(kw))
        xi, ti = x * (1 - 0.02 * 2), t - 10 * 2  # inference tensors, as in every call before
        launched = dispatched(lambda: engine.forward_band(xi, ti, ctx, key="a", **_fresh(kw)), engine.drain)  # no assembly
        engine.close()
        plain_launched = dispatched(lambda: plain(x, t, ctx, **_fresh(kw)))
    return results, launched, plain_launched
