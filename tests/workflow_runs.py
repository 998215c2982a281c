"""The example workflows made small enough to run on CPU in tests: the random checkpoint, LoRA and
ControlNet written by tests/checkpoints.py, small images, 2 steps, 2 CPU ranks."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
CKPT, LORA, CNET = "random_sd15.safetensors", "random_lora.safetensors", "random_controlnet.safetensors"
FLUX = "random_flux_small.safetensors"
FILES = {"ckpt_name": CKPT, "lora_name": LORA, "control_net_name": CNET}


def names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


# Workflows these tests cannot run end to end, and why (their structure is still checked against
# ComfyUI's node definitions in test_workflows).
NOT_RUN = {"flux_dev_txt2img_2048": "Flux's T5-XXL text encoder (4.7B parameters) cannot be written at random here; "
                                    "the Flux path runs through a real server in test_server with CLIP-L conditioning"}


def runnable() -> list:
    """names() as pytest params, the ones in NOT_RUN skipped with their reason."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.skip(reason=NOT_RUN[n])) if n in NOT_RUN else n for n in names()]


@functools.cache
def generator():
    """workflows/generate.py as a module (loaded once)."""
    spec = importlib.util.spec_from_file_location("distri_workflow_generator", WORKFLOWS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _small_inputs(name: str, class_type: str, inputs: dict) -> dict:
    """New values for the widget inputs of one node (only those that change)."""
    out = {k: v for k, v in FILES.items() if k in inputs}
    if class_type == "EmptyLatentImage":
        size = 128 if inputs["width"] >= 1024 else 64  # hires fix: 64 first pass, 2x -> 128
        out.update(width=size, height=size)
    if class_type in ("KSampler", "DistriSampler", "BasicScheduler"):
        out["steps"] = 2
    if class_type == "LoadImage":
        out["image"] = "inpaint.png" if name == "inpainting" else "small.png"
    if class_type == "DistriPatchParallelConfig":
        out.update(devices="cpu", ranks=2)
    return out


def small_api(name: str) -> dict:
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in api.values():
        node["inputs"].update(_small_inputs(name, node["class_type"], node["inputs"]))
    return api


def small_ui(name: str) -> dict:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    types = generator().NODE_TYPES
    for node in ui["nodes"]:
        if node["type"] not in types:  # the sticky note
            continue
        widgets = types[node["type"]]["widgets"]
        values = dict(zip(widgets, node["widgets_values"], strict=False))
        values.update(_small_inputs(name, node["type"], values))
        node["widgets_values"] = [values[w] for w in widgets]
    return copy.deepcopy(ui)


def write_assets(base: Path) -> None:
    """Model files and input images the small workflows use (random weights)."""
    import checkpoints
    from PIL import Image

    models = base / "models"
    if not (models / "checkpoints" / CKPT).exists():
        checkpoints.write_sd15(models / "checkpoints" / CKPT)
    if not (models / "loras" / LORA).exists():
        checkpoints.write_sd15_lora(models / "loras" / LORA)
    if not (models / "controlnet" / CNET).exists():
        checkpoints.write_sd15_controlnet(models / "controlnet" / CNET)
    if not (models / "diffusion_models" / FLUX).exists():
        checkpoints.write_flux_small(models / "diffusion_models" / FLUX)
    inp = base / "input"
    inp.mkdir(parents=True, exist_ok=True)
    grad = Image.linear_gradient("L").resize((64, 64))
    Image.merge("RGB", (grad, grad.rotate(90), grad.rotate(180))).save(inp / "small.png")
    big = Image.merge("RGB", (grad, grad.rotate(90), grad.rotate(180))).resize((128, 128))
    alpha = Image.new("L", (128, 128), 255)
    alpha.paste(0, (32, 40, 96, 100))  # transparent = the area to inpaint
    big.putalpha(alpha)
    big.save(inp / "inpaint.png")
