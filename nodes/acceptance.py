"""The GPU acceptance check's ComfyUI half, run by `python -m distri_core.gpucheck` as
`python nodes/acceptance.py --comfy <ComfyUI> --work <dir> --out <json>` (ComfyUI's requirements
installed in this Python).

It writes a random SDXL checkpoint and ControlNet with ComfyUI's own classes, then for each VRAM
mode (dynamic VRAM on, and off with --disable-dynamic-vram) starts a real ComfyUI server with this
pack and runs the same prompt twice: Distri Sampler (full_sync, every GPU) and KSampler, both with
the ControlNet. Passes when both give the same latent and ComfyUI's own GPU holds no UNet weights
after the Distri run. On a CPU-only machine (`--cpu`) the same script runs with CPU ranks and the
classic patcher (the tests run it that way)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
CKPT, CNET, HINT = "random_{model}.safetensors", "random_{model}_controlnet.safetensors", "acceptance_hint.png"


def write_assets(comfy: Path, work: Path, model: str) -> dict:
    """The random checkpoint, ControlNet and hint image (kept if already there)."""
    import importlib.util

    sys.path[:0] = [str(comfy), str(PACK)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # written on the CPU: the GPU is for the runs
    spec = importlib.util.spec_from_file_location("distri_random_models", PACK / "nodes" / "random_models.py")
    models = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = models
    spec.loader.exec_module(models)
    ckpt = work / "models" / "checkpoints" / CKPT.format(model=model)
    cnet = work / "models" / "controlnet" / CNET.format(model=model)
    t0 = time.perf_counter()
    if not ckpt.exists():
        getattr(models, f"write_{model}")(ckpt)
    if not cnet.exists():
        getattr(models, f"write_{model}_controlnet")(cnet)
    hint = work / "input" / HINT
    if not hint.exists():
        from PIL import Image

        hint.parent.mkdir(parents=True, exist_ok=True)
        grad = Image.linear_gradient("L").resize((256, 256))
        Image.merge("RGB", (grad, grad.rotate(90), grad.rotate(180))).save(hint)
    return {"checkpoint_gb": round(ckpt.stat().st_size / 1e9, 2), "write_s": round(time.perf_counter() - t0, 1)}


def prompt(model: str, sampler_node: str, size: int, steps: int, devices: str, prefix: str) -> dict:
    """An API-format graph: checkpoint, prompts, ControlNet on a hint image, one sampler, the
    latent saved as a file (compared exactly, not through 8-bit pixels)."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT.format(model=model)}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CNET.format(model=model)}},
        "5": {"class_type": "LoadImage", "inputs": {"image": HINT}},
        "6": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["4", 0], "image": ["5", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0, "vae": ["1", 2]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    sampling = {"model": ["1", 0], "seed": 7, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["7", 0],
                "denoise": 1.0}
    if sampler_node == "DistriSampler":
        g["10"] = {"class_type": "DistriPatchParallelConfig", "inputs": {
            "devices": devices, "ranks": 0, "mode": "full_sync", "warmup_steps": 0, "cfg_split": "auto",
            "comm_dtype": "auto", "unsupported": "error"}}
        sampling["config"] = ["10", 0]
    g["8"] = {"class_type": sampler_node, "inputs": sampling}
    return g


def latent_of(server, entry: dict):
    from safetensors.torch import load_file

    for node_out in entry.get("outputs", {}).values():
        for item in node_out.get("latents", []):
            return load_file(str(server.base / "output" / item.get("subfolder", "") / item["filename"]))["latent_tensor"]
    raise RuntimeError(f"no latent in the prompt's outputs: {entry.get('status')}")


def run_mode(comfy: Path, work: Path, mode: str, args) -> dict:
    from distri_core.comfyui import ComfyServer

    extra = ("--disable-dynamic-vram",) if mode == "classic" else ()
    server = ComfyServer(comfy, work, extra_args=extra, cpu=args.cpu)
    out: dict = {"vram_mode": mode}
    try:
        server.wait_ready(600)
        log = server.log()
        out["dynamic_vram_enabled"] = "DynamicVRAM support detected and enabled" in log
        timings = {}
        latents = {}
        for node in ("DistriSampler", "KSampler"):  # Distri first: the host GPU has seen no UNet yet
            t0 = time.perf_counter()
            entry = server.run(prompt(args.model, node, args.size, args.steps, args.devices, f"{mode}_{node}"), 1800)
            timings[node] = round(time.perf_counter() - t0, 2)
            if entry["status"].get("status_str") != "success":
                raise RuntimeError(f"{node} failed: {json.dumps(entry['status'])[-3000:]}\n{server.log()[-3000:]}")
            latents[node] = latent_of(server, entry)
            if node == "DistriSampler":
                status = server.get("/distri/status")
                out["host_after_distri"] = status.get("host", {})
                out["pool"] = {k: status.get(k) for k in ("state", "devices", "backend", "model", "model_mb")}
                out["pool"]["workers"] = [{k: w.get(k) for k in ("rank", "device", "memory")} for w in status["workers"]]
        out["host_after_ksampler"] = server.get("/distri/status").get("host", {})
        out["seconds"] = timings
        a, b = latents["DistriSampler"].float(), latents["KSampler"].float()
        scale = float(b.abs().max())
        out["max_abs_diff"] = float((a - b).abs().max())
        out["max_rel_diff"] = out["max_abs_diff"] / max(scale, 1e-12)
        out["same_latent"] = out["max_rel_diff"] < args.tolerance
        unet_mb = out["pool"].get("model_mb") or 0
        host_mb = out["host_after_distri"].get("torch_allocated_mb")
        out["unet_weights_on_host_gpu"] = None if host_mb is None else host_mb > 0.5 * unet_mb
        out["status"] = "pass" if out["same_latent"] and not out["unet_weights_on_host_gpu"] else "fail"
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out.update(status="fail", error=f"{type(e).__name__}: {e}"[-4000:])
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nodes/acceptance.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", required=True, help="the ComfyUI checkout")
    p.add_argument("--work", required=True, help="a directory for models, inputs and outputs")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--model", default="sdxl", choices=("sdxl", "sd15"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--vram", default="dynamic,classic", help="comma list of: dynamic, classic")
    p.add_argument("--devices", default="auto", help="Patch Parallel Config's devices")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu (CPU ranks; the tests)")
    p.add_argument("--tolerance", type=float, default=2e-3, help="max relative latent difference for 'same'")
    args = p.parse_args(argv)
    comfy, work = Path(args.comfy).resolve(), Path(args.work).resolve()
    sys.path.insert(0, str(PACK))
    result = {"model": args.model, "size": args.size, "steps": args.steps}
    try:
        result["assets"] = write_assets(comfy, work, args.model)
        result["modes"] = [run_mode(comfy, work, mode, args) for mode in args.vram.split(",") if mode]
        result["status"] = "pass" if all(m["status"] == "pass" for m in result["modes"]) else "fail"
    except Exception as e:  # noqa: BLE001
        result.update(status="fail", error=f"{type(e).__name__}: {e}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
