"""HTTP routes and browser events: the pool's status for the GUI panel and for diagnosis."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("distri_patch_parallel")

EVENT = "distri.status"
_last_run: dict = {}


def pool_status() -> dict:
    from distri_core.runtime.pool import current_pool

    pool = current_pool()
    if pool is None:
        status = {"state": "not started", "workers": [], "devices": [], "runs": 0, "calls": 0, "last_error": "",
                  "last_call": {}, "config": None, "model_key": None}
    else:
        status = pool.status()
    status["run"] = dict(_last_run)
    status["host"] = host_memory()
    return status


def host_memory() -> dict:
    """ComfyUI's own GPU memory (its CLIP, VAE, ControlNet; never a Distri model's UNet)."""
    try:
        import comfy.model_management as mm
        import torch
    except ImportError:
        return {}
    device = mm.get_torch_device()
    if torch.device(device).type != "cuda":
        return {"device": str(device)}
    return {"device": str(device), "torch_allocated_mb": round(torch.cuda.memory_allocated(device) / 2 ** 20, 1),
            "torch_reserved_mb": round(torch.cuda.memory_reserved(device) / 2 ** 20, 1)}


def notify(run: dict | None = None) -> None:
    """Push the pool status (and the current run's progress) to every open browser tab."""
    if run is not None:
        _last_run.clear()
        _last_run.update(run)
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(EVENT, pool_status())


def register() -> None:
    """Add GET /distri/status; must run at import time (routes added later are ignored)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return

    @server.routes.get("/distri/status")
    async def status(request):
        return web.json_response(pool_status())

    @server.routes.post("/distri/stop")
    async def stop(request):
        """Stop the workers (frees their GPU memory); the next Distri run starts them again."""
        from distri_core.runtime.pool import current_pool

        pool = current_pool()
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.close)
        notify()
        return web.json_response(pool_status())

    @server.routes.get("/distri/plan")
    async def plan(request):
        q = request.rel_url.query
        try:
            return web.json_response(split_plan(q.get("devices", "auto"), int(q.get("ranks", 0)),
                                                int(q.get("width", 1024)), int(q.get("height", 1024)),
                                                q.get("cfg_split", "auto"), q.get("cfg", "on") != "off",
                                                q.get("mode", "corrected_async_gn"), int(q.get("steps", 20)),
                                                int(q.get("warmup_steps", 4))))
        except (ValueError, RuntimeError) as e:
            return web.json_response({"error": str(e)})

    @server.routes.post("/distri/profile/reset")
    async def reset_profiles(request):
        """Forget the measured machine profiles: mode auto measures again at its next run."""
        from .planning import forget_profiles

        return web.json_response({"removed": forget_profiles()})


def split_plan(devices: str, ranks: int, width: int, height: int, cfg_split: str, cfg_on: bool,
               mode: str = "corrected_async_gn", steps: int = 20, warmup: int = 4) -> dict:
    """How an image of width x height pixels is cut: groups of ranks, batch halves, row bands, as the
    engine will cut it: the band unit of the model the pool holds (else SDXL's 32 px, the finest
    of the supported UNets) and the smaller band for a rank on ComfyUI's own GPU. With mode auto,
    the planner's choice for this size and step count where this machine has a profile (else the
    plan of every device, until the first run measures one), and the last run's plan."""
    from distri_core import make_layout
    from distri_core.runtime.pool import current_pool

    from .config_node import build_settings
    from .planning import last_plan, preview_plan

    settings = build_settings(devices, ranks, mode, warmup, cfg_split, "auto", "error")
    config, resolved = settings.config, settings.devices
    pool = current_pool()
    unit = (pool.model_info.get("unit") if pool is not None else None) or 4
    auto = None
    if config.mode.value == "auto":
        plan = preview_plan(config, 2 if cfg_on else 1, height // 8, width // 8, unit, steps)
        auto = {"last_run": dict(last_plan), "plan": plan.summary() if plan else None,
                "text": plan.to_text() if plan else "auto: the layout is chosen at the first run, after measuring "
                                                       "this machine once (a few seconds)"}
        if plan is not None:
            config, resolved = plan.config, plan.config.devices or tuple(resolved[r] for r in plan.config.pool_ranks)
    layout = make_layout(len(resolved), 2 if cfg_on else 1, height // 8, unit, config.split_cfg_possible,
                         config.light_ranks, config.band_shares)
    groups = []
    for members, chunk in zip(layout.groups, layout.chunks, strict=True):
        bands = [{"rank": r, "device": resolved[r], "rows_px": [layout.bands.rows(i)[0] * 8, layout.bands.rows(i)[1] * 8],
                  "shares_comfyui_gpu": r in config.light_ranks} for i, r in enumerate(members)]
        groups.append({"branch": ("cond" if chunk[0] == 0 else "uncond") if len(layout.groups) > 1 else "both",
                       "bands": bands})
    return {"width": width, "height": height, "ranks": len(resolved), "cfg_split": len(layout.groups) > 1,
            "unit_px": unit * 8, "unit_from": "the loaded model" if pool is not None and pool.model_info.get("unit")
            else "SDXL's (no model loaded yet)", "groups": groups, "auto": auto}
