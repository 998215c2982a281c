"""Distri Patch Parallel: one high-resolution image sampled by several GPUs at once
(DistriFusion's displaced patch parallelism), as ComfyUI nodes.

Inside ComfyUI this module exposes `comfy_entrypoint` (V3 nodes) and `WEB_DIRECTORY`. Anywhere
else (pytest, `python -m distri_core.bench`) importing it does nothing, so the engine and its
tests run on a bare torch install. On a platform the worker pool cannot run on (it needs Linux:
/dev/shm, process sessions, NCCL), ComfyUI gets one clear message at load time and no nodes.
"""

import logging
import os
import sys

WEB_DIRECTORY = "./web"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _comfy_available() -> bool:
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


UNSUPPORTED_PLATFORM = (
    "Distri Patch Parallel needs Linux (this is {platform}): its GPU workers use /dev/shm, Linux process "
    "sessions and NCCL. On Windows, run ComfyUI under WSL2 (NVIDIA's CUDA on WSL); macOS has no CUDA. The pack's "
    "nodes are not loaded."
)


def _supported_platform() -> bool:
    return sys.platform.startswith("linux")


if not _supported_platform():
    logging.getLogger("distri_patch_parallel").error(UNSUPPORTED_PLATFORM.format(platform=sys.platform))
    __all__ = ["WEB_DIRECTORY"]
elif _comfy_available() and os.path.isfile(os.path.join(_HERE, "nodes", "__init__.py")):
    # Worker processes import `distri_core` by its own name: make the pack's folder importable.
    if _HERE not in sys.path:
        sys.path.append(_HERE)
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    __all__ = ["WEB_DIRECTORY"]
