"""Run inside each pool worker (loaded by file path) before it builds ComfyUI's UNet.

Makes the host's ComfyUI importable with the host's command-line options, on the worker's own
device: a CPU worker gets --cpu, a GPU worker sees only its GPU (as cuda:0).
"""

import os
import sys


def setup(comfy_root: str, args: dict) -> None:
    if comfy_root not in sys.path:
        sys.path.insert(0, comfy_root)
    import comfy.cli_args

    for name, value in args.items():
        if hasattr(comfy.cli_args.args, name):
            setattr(comfy.cli_args.args, name, value)
    comfy.cli_args.args.cpu = os.environ.get("DISTRI_DEVICE", "cpu").startswith("cpu")
    comfy.cli_args.args.cuda_device = None
    import comfy.model_management  # noqa: F401  (device set-up happens at import)
