"""Model specs and weights for pool tests: the diffusers `micro` UNet (no ComfyUI needed)."""

from __future__ import annotations

import os

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
