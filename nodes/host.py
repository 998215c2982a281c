"""The host side of a Distri model: ComfyUI keeps running the sampler on its own GPU (noise,
latents, conds, ControlNet, previews stay there), while the UNet's weights never load onto it.

A Distri clone's ModelPatcher gets a class that mixes `HostWithoutUNet` over its own class
(ModelPatcher or, with dynamic VRAM, ModelPatcherDynamic). Its `load_device` stays the host's
GPU; loading puts nothing there: the weights go back to (or stay on) the CPU, from where they are
shipped to the workers. Clones keep the class, so LoRA nodes placed after Distri Model work.
ComfyUI budgets the model at the size of its non-UNet parts, and during a Distri run the model's
memory estimate covers only the tensors that cross to the pool, so cond and uncond are batched
into one call (what CFG split needs).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.model_patcher
import torch

PREFIX = "diffusion_model."
_CLASSES: dict[type, type] = {}


class HostWithoutUNet:
    """Mixed over a ModelPatcher class: the patcher loads everything but the UNet's weights."""

    distri_host = True

    def model_size(self):  # what ComfyUI budgets for this model on the host's GPU
        size = self.__dict__.get("_distri_size")
        if size is None:
            size = sum(t.nbytes for k, t in self.model.state_dict().items() if not k.startswith(PREFIX))
            self._distri_size = size = max(size, 1)
        return size

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            # Restore unpatched weights on the CPU (also undoing an earlier single-device run
            # that patched and loaded the shared model), then apply the object patches only.
            self.unpatch_model(self.offload_device, unpatch_weights=True)
            self.patch_model(load_weights=False)
        return 0

    def load(self, *args, **kwargs):  # whoever asks for a full load gets none
        return None

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        if key.startswith(PREFIX) and device_to is not None:
            device_to = torch.device("cpu")  # saving or hooks: compute UNet weights on the CPU
        return super().patch_weight_to_device(key, device_to, *args, **kwargs)

    def clone(self, *args, **kwargs):
        n = super().clone(*args, **kwargs)
        if not isinstance(n, HostWithoutUNet):
            n.size = 0  # a plain patcher (clone(disable_dynamic=True)) must not inherit our size
        return n


def hostless(model):
    """A clone of `model` whose load puts no UNet weight on the host's GPU."""
    base_cls = type(model)
    cls = base_cls if issubclass(base_cls, HostWithoutUNet) else _CLASSES.get(base_cls)
    if cls is None:
        cls = _CLASSES[base_cls] = type("Distri" + base_cls.__name__, (HostWithoutUNet, base_cls), {})
    clone = model.clone()
    clone.__class__ = cls
    clone.offload_device = torch.device("cpu")
    clone._distri_size = None
    return clone


def io_memory_required(input_shape, cond_shapes={}):
    """Host memory of one pool call: the latent in and out, a few temporaries, the conds."""
    conds = sum(math.prod(s) for shapes in cond_shapes.values() for s in shapes)
    return 4 * (6 * math.prod(input_shape) + conds)


@contextmanager
def pool_memory_estimate(base_model):
    """During a Distri run, the model's memory estimate is what the host holds per UNet call (the
    UNet runs in the pool): ComfyUI then batches cond and uncond into one call and frees host
    memory only for what the host itself runs."""
    base_model.memory_required = io_memory_required
    try:
        yield
    finally:
        base_model.__dict__.pop("memory_required", None)


class PoolMemory(comfy.model_patcher.ModelPatcher):
    """ComfyUI's view of the memory the Distri workers hold on one device: a weightless entry in
    ComfyUI's loaded-model list. When ComfyUI frees memory there (POST /free, unload_all_models,
    before loading a model that does not fit, an out-of-memory retry) it unloads this entry like
    any model, and the workers give back their stale state and cached GPU memory."""

    def __init__(self, device: torch.device):
        super().__init__(torch.nn.Module(), load_device=device, offload_device=torch.device("cpu"), size=1)
        self.pool = None

    def held(self) -> int:
        """Bytes the pool's workers on this device hold (the CUDA allocator's reserve)."""
        if self.pool is None or self.load_device.type != "cuda":
            return 0
        mine = [w for w in self.pool.status()["workers"] if w["device"] == str(self.load_device)]
        return int(sum(w["memory"].get("cuda_reserved_mb", 0) for w in mine) * 2 ** 20)

    def model_size(self):
        return max(1, self.held())

    def loaded_size(self):
        return self.held()

    def current_loaded_device(self):
        return self.load_device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        held = self.held()
        self._release()
        return held

    def detach(self, unpatch_all=True):
        self._release()
        return super().detach(unpatch_all)

    def _release(self) -> None:
        if self.pool is not None and self.pool.state == "ready":
            self.pool.release()


_MEMORY: dict[str, PoolMemory] = {}


def track_pool_memory(pool) -> None:
    """Put (back) one PoolMemory entry per pool device into ComfyUI's loaded-model list."""
    for device in dict.fromkeys(pool.devices):
        entry = _MEMORY.get(device)
        if entry is None:
            entry = _MEMORY[device] = PoolMemory(torch.device(device))
        entry.pool = pool
        loaded = mm.LoadedModel(entry)
        if loaded not in mm.current_loaded_models:
            loaded.model_load(0)
            mm.current_loaded_models.append(loaded)
