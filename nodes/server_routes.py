"""HTTP routes and browser events: the pool's status for the GUI panel and for diagnosis."""

from __future__ import annotations

import logging

log = logging.getLogger("distri_patch_parallel")

EVENT = "distri.status"


def pool_status() -> dict:
    from distri_core.runtime.pool import current_pool

    pool = current_pool()
    if pool is None:
        return {"state": "not started", "workers": [], "devices": [], "runs": 0, "calls": 0, "last_error": "",
                "last_call": {}, "config": None, "model_key": None}
    return pool.status()


def notify(extra: dict | None = None) -> None:
    """Push the pool status (plus `extra`, e.g. run progress) to every open browser tab."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(EVENT, {**pool_status(), **(extra or {})})


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
