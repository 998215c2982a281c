"""Model specs and weights for pool tests: the diffusers `micro` UNet (no ComfyUI needed)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from distri_core import zoo
from distri_core.runtime.pool import ModelSpec


def micro_spec() -> ModelSpec:
    return ModelSpec(factory="diffusers:UNet2DConditionModel", kwargs=zoo.diffusers_config("micro"))


def micro_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return zoo.build("micro", seed=seed).state_dict()


def failing_factory(**kwargs):
    """Builds the micro UNet, except on rank 1, where it raises (a worker-side error)."""
    from diffusers import UNet2DConditionModel

    if os.environ.get("DISTRI_RANK") == "1":
        raise RuntimeError("deliberate failure on rank 1")
    return UNet2DConditionModel(**kwargs)


def micro_reference(x, t, ctx, seed: int = 0):
    """The micro UNet's output on one device."""
    return micro_reference_with(x, t, ctx, seed=seed)


@functools.cache
def micro_model(seed: int = 0):
    """The micro UNet on this process, built once per seed."""
    return zoo.build("micro", seed=seed)


def micro_reference_with(x, t, ctx, seed: int = 0, **kwargs):
    """The micro UNet's output on one device, with extra UNet inputs (ControlNet residuals)."""
    with torch.inference_mode():
        return micro_model(seed)(x, t, encoder_hidden_states=ctx, **kwargs).sample


@contextmanager
def micro_pool(key: str = "micro-0") -> Iterator:
    """A 2-CPU-rank WorkerPool in full_sync (no CFG split) with the micro UNet loaded."""
    from distri_core import PatchParallelConfig
    from distri_core.runtime.pool import WorkerPool

    pool = WorkerPool(["cpu", "cpu"])
    try:
        pool.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=False))
        pool.load_model(key, micro_spec(), micro_weights)
        yield pool
    finally:
        pool.close()


def slow_weights(delay: float, seed: int = 0):
    """The micro weights, produced one at a time with a delay each (a large model's patching)."""
    import time

    from distri_core.runtime.pool import LazyWeights

    state = micro_weights(seed)

    def get(name):
        time.sleep(delay)
        return state[name]

    return LazyWeights([(k, tuple(v.shape), v.dtype) for k, v in state.items()], get)


def small_gpu_factory(max_load: int = 0, **kwargs):
    """The micro UNet on a device that runs out of memory above `max_load` images x latent pixels
    per call, as a small GPU does with CUDA's OutOfMemoryError (the CPU would just swap)."""
    from diffusers import UNet2DConditionModel

    class SmallGpuUNet(UNet2DConditionModel):
        def forward(self, sample, *args, **kw):
            load = sample.shape[0] * sample.shape[2] * sample.shape[3]
            if load > max_load:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {load} units (imitated: this "
                                             f"device holds {max_load})")
            return super().forward(sample, *args, **kw)

    return SmallGpuUNet(**kwargs)
