"""Run inside each pool worker (loaded by file path) before it builds ComfyUI's UNet.

Makes the host's ComfyUI importable with the host's command-line options, on the worker's own
device: a CPU worker gets --cpu, a GPU worker sees only its GPU (as cuda:0). `comfy_weights` is
the weight accessor the distributed layers use, so they read weights exactly as ComfyUI's ops do.
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


def comfy_weights(module, x):
    """comfy.ops.cast_bias_weight where the op casts (manual_cast: fp8 weights computed in fp16),
    else the plain parameters in x's dtype."""
    import comfy.ops

    from distri_core.layers.base import plain_weights

    if getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) \
            or getattr(module, "bias_function", None):
        w, b, stream = comfy.ops.cast_bias_weight(module, x, offloadable=True)
        return w, b, (lambda: comfy.ops.uncast_bias_weight(module, w, b, stream))
    return plain_weights(module, x)
