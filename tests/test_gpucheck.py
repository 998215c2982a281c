"""The GPU acceptance check's parts that run without a GPU: its skip messages and report, the
pool run it makes (on CPU ranks), its band timing (on the CPU), and its ComfyUI half (a real
ComfyUI server, CPU ranks, an SD1.5-shaped checkpoint). On a GPU machine the same code runs with
CUDA: `python -m distri_core.gpucheck` and `pytest -m gpu`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_without_cuda_every_gpu_section_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "gpu" / "here.json"
    done = subprocess.run([sys.executable, "-m", "distri_core.gpucheck", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert set(report["sections"]) == {"pool", "shared", "timing", "compile", "comfy"}
    for section in report["sections"].values():
        assert section["status"] == "skip"
        assert section["reason"].startswith("no CUDA device: torch.cuda.is_available() is False"), section
    assert report["env"]["cuda_available"] is False and report["env"]["torch"] == torch.__version__
    table = out.with_suffix(".md").read_text()
    assert "| pool | skip |" in table and "no CUDA device" in table
    strict = subprocess.run([sys.executable, "-m", "distri_core.gpucheck", "--out", str(out), "--require-gpu",
                             "--sections", "pool"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 3


def test_pool_run_checks_exactness_a_killed_worker_and_the_next_run():
    from distri_core.gpucheck.checks import pool_run

    result = pool_run(["cpu", "cpu"], model="tiny", dtypes=("fp32", "bf16"), size=128, kill=True)
    assert result["status"] == "pass", result
    assert result["dtypes"]["fp32"]["max_rel_diff"] < 1e-5 and result["dtypes"]["fp32"]["bytes_per_call"] > 0
    bf16 = result["dtypes"]["bf16"]
    assert bf16["rounding_of_dtype"] > 0 and bf16["max_abs_diff"] <= 2 * bf16["rounding_of_dtype"]
    assert result["kill"]["detected"] and result["kill"]["pool_state_after"] == "broken"
    # Displaced steps of an unchanged input, in both displaced modes, through the pool: exact.
    assert sorted(result["displaced"]) == ["corrected_async_gn", "corrected_extrapolated"], result["displaced"]
    assert all(len(calls) == 4 and all(c["exact"] for c in calls) for calls in result["displaced"].values())


def test_band_ceiling_rows_and_report():
    from distri_core.gpucheck.report import markdown
    from distri_core.gpucheck.timing import band_ceiling

    rows = band_ceiling("tiny", torch.float32, 2, sizes=(128,), bands=(2, 4), device="cpu", repeats=1)
    assert [r["bands"] for r in rows] == [1, 2, 4]
    whole, *bands = rows
    assert whole["bytes_per_call"] == 0 and all(r["bytes_per_call"] > 0 and r["stale_mb"] > 0 for r in bands)
    # a rank of more bands holds more peers' K/V: its stale state grows with the band count
    assert bands[1]["stale_mb"] > bands[0]["stale_mb"]
    text = markdown({"name": "t", "env": {}, "sections": {"timing": {"status": "pass", "rows": rows}}})
    assert "| 128² | 4 |" in text


def test_the_timed_peerless_rank_does_a_real_ranks_work(cluster):
    # The ceiling times one rank with no peers: its band, buffers and exchanges (counted, not sent)
    # must be exactly a real rank's, or the ceiling times some other work.
    import tasks

    for real, solo in cluster.run(tasks.solo_vs_real, size=2):
        assert real == solo, (real, solo)


def test_comfyui_half_on_cpu_ranks(comfy_root, comfy_base, tmp_path):
    # The acceptance script's whole flow (random checkpoint and ControlNet found, a real ComfyUI
    # server with this pack, Distri Sampler and KSampler with a ControlNet, latents compared,
    # ComfyUI's own memory reported), on CPU ranks with an SD1.5-shaped checkpoint.
    import workflow_runs

    controlnet = comfy_base / "models" / "controlnet" / "random_sd15_controlnet.safetensors"
    if not controlnet.exists():
        controlnet.symlink_to(comfy_base / "models" / "controlnet" / workflow_runs.CNET)
    out = tmp_path / "acceptance.json"
    done = subprocess.run([sys.executable, str(ROOT / "nodes" / "acceptance.py"), "--comfy", str(comfy_root),
                           "--work", str(comfy_base), "--out", str(out), "--model", "sd15", "--size", "64",
                           "--steps", "2", "--vram", "classic", "--devices", "cpu", "--cpu", "--tolerance", "1e-4"],
                          capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result["status"] == "pass", json.dumps(result, indent=1)[-4000:]
    (mode,) = result["modes"]
    assert mode["same_latent"] and mode["pool"]["state"] == "ready" and mode["host_after_distri"]["device"] == "cpu"


def test_compile_rows_and_report():
    # The compile section's harness on the CPU with compile off (compiling is tested on the engine,
    # tests/test_engine.py, and costs minutes here); cuda_graphs is skipped off GPU.
    from distri_core.gpucheck.report import markdown
    from distri_core.gpucheck.timing import compile_rows

    rows = compile_rows("tiny", torch.float32, 2, sizes=(128,), bands=2, device="cpu", repeats=1,
                        settings=("off", "cuda_graphs"))
    assert [r["compile"] for r in rows] == ["off"]
    assert rows[0]["ms"] > 0 and rows[0]["graphs"] == 0 and rows[0]["max_abs_diff_vs_off"] == 0
    text = markdown({"name": "t", "env": {}, "sections": {"compile": {"status": "pass", "rows": rows}}})
    assert "| 128² | off |" in text
