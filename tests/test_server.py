"""Headless: a real ComfyUI server with the pack in custom_nodes, a random SD1.5-shaped
checkpoint written by our own code, and API-format prompts posted to /prompt."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_server import still_alive
from workflow_runs import CKPT


def txt2img(sampler: str, *, mode: str = "full_sync", seed: int = 1, size: int = 192, steps: int = 2,
            freeu: bool = False) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> (Distri)Sampler -> VAEDecode -> SaveImage."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dawn, detailed", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{sampler}_{mode}"}},
    }
    model = ["1", 0]
    if freeu:
        g["9"] = {"class_type": "FreeU_V2", "inputs": {"model": model, "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}}
        model = ["9", 0]
    common = {"model": model, "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}
    if sampler == "KSampler":
        g["5"] = {"class_type": "KSampler", "inputs": common}
    else:
        g["8"] = {"class_type": "DistriPatchParallelConfig",
                  "inputs": {"devices": "cpu", "ranks": 2, "mode": mode, "warmup_steps": 1, "cfg_split": "off",
                             "comm_dtype": "auto", "unsupported": "error"}}
        g["5"] = {"class_type": "DistriSampler", "inputs": {**common, "config": ["8", 0]}}
    return g


@pytest.fixture
def server(comfy_server):
    return comfy_server


def _pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_distri_sampler_through_the_api_matches_ksampler(server):
    ref = server.run(txt2img("KSampler"))
    assert ref["status"]["status_str"] == "success", ref["status"]
    out = server.run(txt2img("DistriSampler"))
    assert out["status"]["status_str"] == "success", out["status"]
    (a,), (b,) = server.images(ref), server.images(out)
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape == pb.shape == (192, 192, 3)  # latent 24 rows: uneven bands of 16 and 8
    assert pa.std() > 1.0  # a real image, not a flat fill
    assert np.abs(pa - pb).max() <= 1, np.abs(pa - pb).max()
    status = server.get("/distri/status")
    assert status["state"] == "ready" and len(status["workers"]) == 2 and status["runs"] >= 1


def test_node_errors_reach_the_history_and_the_server_keeps_working(server):
    bad = server.run(txt2img("DistriSampler", freeu=True))
    assert bad["status"]["status_str"] == "error"
    messages = str(bad["status"]["messages"])
    assert "FreeU" in messages and "single_device" in messages
    ok = server.run(txt2img("DistriSampler", mode="corrected_async_gn", seed=2))
    assert ok["status"]["status_str"] == "success" and server.images(ok)


def test_invalid_config_is_rejected_before_anything_runs(server):
    prompt = txt2img("DistriSampler")
    prompt["8"]["inputs"].update(devices="cuda:7", ranks=0)
    with pytest.raises(RuntimeError) as e:
        server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert "custom_validation_failed" in str(e.value)
    assert "devices ['cuda:7'] are not on this machine" in str(e.value)
    prompt["8"]["inputs"].update(devices="cpu", ranks=3, cfg_split="on")
    with pytest.raises(RuntimeError, match="cfg_split=True needs an even number of ranks"):
        server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})


def test_stop_route_frees_the_workers_and_the_next_run_restarts_them(server):
    pids = [w["pid"] for w in server.get("/distri/status")["workers"]]
    assert pids
    assert server.post("/distri/stop", {})["state"] == "stopped"
    assert not still_alive(pids, 15)
    done = server.run(txt2img("DistriSampler", size=128, steps=1))
    assert done["status"]["status_str"] == "success"
    fresh = [w["pid"] for w in server.get("/distri/status")["workers"]]
    assert len(fresh) == 2 and not set(fresh) & set(pids)



def flux_txt2img(sampler: str, size: int = 128, steps: int = 3) -> dict:
    """UNETLoader (a random Flux.1 our code wrote, detected by ComfyUI's loader) conditioned by the
    SD1.5 checkpoint's CLIP-L -> FluxGuidance -> EmptySD3LatentImage -> sampler -> SaveLatent."""
    from workflow_runs import FLUX

    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dawn", "clip": ["1", 1]}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX, "weight_dtype": "default"}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/flux_{sampler}"}},
    }
    common = {"model": ["3", 0], "seed": 3, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}
    if sampler == "KSampler":
        g["6"] = {"class_type": "KSampler", "inputs": common}
    else:
        g["8"] = {"class_type": "DistriPatchParallelConfig",
                  "inputs": {"devices": "cpu", "ranks": 2, "mode": "full_sync", "warmup_steps": 1,
                             "cfg_split": "auto", "comm_dtype": "auto", "unsupported": "error"}}
        g["6"] = {"class_type": "DistriSampler", "inputs": {**common, "config": ["8", 0]}}
    return g


def test_flux_through_the_api_matches_ksampler(server):
    from safetensors.torch import load_file

    def latent(entry):
        item = next(i for out in entry["outputs"].values() for i in out.get("latents", []))
        return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]

    ref = server.run(flux_txt2img("KSampler"))
    assert ref["status"]["status_str"] == "success", ref["status"]
    out = server.run(flux_txt2img("DistriSampler"))
    assert out["status"]["status_str"] == "success", out["status"]
    a, b = latent(out).float(), latent(ref).float()
    assert a.shape == (1, 16, 16, 16) and b.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max())), float((a - b).abs().max())
    assert server.get("/distri/status")["model"].startswith("Flux")
