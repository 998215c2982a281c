"""`python -m distri_core.gpucheck --out docs/gpu/<name>.json [--quick]` (see the package docs)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..comfyui import PACK_ROOT, find_comfyui
from ..runtime.devices import available_devices
from .checks import environment, pool_run
from .report import markdown
from .timing import band_ceiling, compile_rows

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False (torch {torch}, CUDA build {cuda})"


def sections(args) -> dict:
    """name -> (function returning the section's dict, or a skip reason)."""
    quick = args.quick
    gpus = available_devices()
    skip = None if gpus else NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda)
    plan = {
        "pool": skip or (lambda: pool_run(gpus, model="sd15", dtypes=("fp16",), size=512 if quick else 1024)),
        "shared": skip or (lambda: pool_run(["cuda:0", "cuda:0"], backend="gloo", share_devices=True, model="sdxl",
                                            dtypes=("fp16",) if quick else ("fp16", "bf16"),
                                            size=512 if quick else 1024, kill=False)),
        "timing": skip or (lambda: {"status": "pass", "rows": band_ceiling(
            "sdxl", torch.float16, 2, sizes=(1024, 2048) if quick else (1024, 2048, 4096), bands=(2, 4, 8),
            device="cuda:0", repeats=2 if quick else 3)}),
        "compile": skip or (lambda: _compile_section(quick)),
        "comfy": skip or _comfy_skip(args) or (lambda: comfy_section(args)),
    }
    return {name: plan[name] for name in args.sections.split(",") if name in plan}


def _compile_section(quick: bool) -> dict:
    rows = compile_rows("sdxl", torch.float16, 2, sizes=(1024,) if quick else (1024, 2048), bands=2,
                        device="cuda:0", repeats=2 if quick else 3)
    bad = [r for r in rows if "error" in r or r["max_abs_diff_vs_off"] > 0.05]
    return {"status": "fail" if bad else "pass", "rows": rows}


def _comfy_skip(args) -> str | None:
    if args.quick:
        return "skipped in --quick (it writes a 6.9 GB checkpoint and starts ComfyUI twice)"
    if find_comfyui() is None:
        return "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout with its requirements installed"
    return None


def comfy_section(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="distri-gpucheck-"))
    out = work / "acceptance.json"
    cmd = [sys.executable, str(PACK_ROOT / "nodes" / "acceptance.py"), "--comfy", str(find_comfyui()), "--work",
           str(work), "--out", str(out), "--model", "sdxl", "--size", "1024", "--steps", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.comfy_timeout)
    if not out.exists():
        return {"status": "fail", "error": (done.stdout + done.stderr)[-4000:]}
    return json.loads(out.read_text())


def run(args) -> dict:
    report = {"name": Path(args.out).stem, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "env": environment(), "sections": {}}
    write(report, args.out)
    for name, job in sections(args).items():
        t0 = time.perf_counter()
        if isinstance(job, str):
            result = {"status": "skip", "reason": job}
        else:
            try:
                result = job()
            except Exception as e:  # noqa: BLE001 - one failed section does not stop the others
                result = {"status": "fail", "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = result
        logging.getLogger("distri_core.gpucheck").info("%s: %s (%.1f s)", name, result["status"], result["seconds"])
        write(report, args.out)
    return report


def write(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distri_core.gpucheck", description=__doc__)
    p.add_argument("--out", required=True, help="the JSON to write (a .md table is written beside it)")
    p.add_argument("--quick", action="store_true", help="a subset in under 2 minutes on one H200")
    p.add_argument("--sections", default="pool,shared,timing,compile,comfy", help="comma list of sections to run")
    p.add_argument("--work", default="", help="directory for the ComfyUI section's models (default: a temp dir)")
    p.add_argument("--comfy-timeout", type=float, default=900.0)
    p.add_argument("--require-gpu", action="store_true", help="exit with code 3 when there is no CUDA device")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    report = run(args)
    print(markdown(report))
    if args.require_gpu and not torch.cuda.is_available():
        return 3
    return 1 if any(s["status"] == "fail" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
