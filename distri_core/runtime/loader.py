"""The worker's side of loading a model: resolve the factory a `ModelSpec` names, build the
model without memory (meta), then either compute straight from shared weights (CPU ranks) or
allocate it on the device after checking that it fits."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import torch

from .devices import PHYSICAL_ENV, fmt_bytes, mem_available
from .errors import ResourceError

# Room a GPU keeps beyond the weights for activations, stale buffers and the CUDA context.
HEADROOM = 1 << 30


def resolve(target: str) -> Any:
    """'package.module:attr' or '/path/to/file.py:attr'."""
    module_name, _, attr = target.partition(":")
    if module_name.endswith(".py"):
        name = "distri_ext_" + os.path.splitext(os.path.basename(module_name))[0]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj = module
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def device_memory(device: torch.device) -> dict:
    """This process's resident memory, and its GPU memory on a CUDA device."""
    import resource

    mem = {"rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            mem["rss_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        mem["cuda_mb"] = round(torch.cuda.memory_allocated(device) / 2 ** 20, 1)
        mem["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        mem["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(device) / 2 ** 20, 1)
    return mem


def build_on_meta(spec) -> torch.nn.Module:
    """The spec's model with no memory behind it, in the dtypes it will be stored in."""
    factory = resolve(spec.factory)
    with torch.device("meta"):
        model = factory(**spec.kwargs)
    if spec.storage_dtype is None and any(p.is_floating_point() and p.dtype != spec.dtype
                                          for p in model.parameters()):
        model = model.to(spec.dtype)  # free on meta
    return model


def _nbytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_fits(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse, with the numbers, a model whose weights do not fit in the device's free memory."""
    need = _nbytes(model)
    if device.type != "cuda":
        available = mem_available()
        if available is not None and need > available:
            raise ResourceError(f"the model's weights need {fmt_bytes(need)} of host memory in each CPU worker and "
                                f"{fmt_bytes(available)} is available; use weights='shared' (one copy for every CPU "
                                "rank), fewer ranks, or GPUs")
        return
    free, total = torch.cuda.mem_get_info(device)
    if need + HEADROOM > free:
        physical = os.environ.get(PHYSICAL_ENV, str(device.index or 0))
        raise ResourceError(f"the model's weights need {fmt_bytes(need)} (plus about {fmt_bytes(HEADROOM)} to run) "
                            f"on GPU {physical}, which has {fmt_bytes(free)} free of {fmt_bytes(total)}; another "
                            "program (or ComfyUI itself) holds that GPU's memory: free it, choose other devices, or "
                            "use a smaller dtype")


def finish_model(model: torch.nn.Module, spec, device: torch.device, allocate: bool) -> torch.nn.Module:
    """Allocate a meta model on `device` (after checking it fits), eval mode, no grad."""
    if allocate:
        check_fits(model, device)
        model = model.to_empty(device=device)
    return model.eval().requires_grad_(False)


def shared_model(spec, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A model computing from `state`, tensors in a shared segment: CPU ranks use them in place
    (one copy of the weights for every rank, nothing to load); other devices copy them."""
    model = build_on_meta(spec)
    params = dict(model.named_parameters())
    if device.type == "cpu" and all(t.dtype == params[n].dtype for n, t in state.items() if n in params):
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{spec.factory} has tensors the weights do not cover: {left[:5]}")
        model = finish_model(model, spec, device, allocate=False)
    else:
        model = finish_model(model, spec, device, allocate=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit {spec.factory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
