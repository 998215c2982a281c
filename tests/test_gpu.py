"""The GPU acceptance check as tests (`pytest -m gpu`): the NCCL pool over every visible GPU, two
ranks on one GPU through gloo, the band timing with CUDA events and the host-sync count. Skipped
on machines without CUDA, saying so; `python -m distri_core.gpucheck` runs the same code and
writes the JSON committed under docs/gpu/."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs an NVIDIA GPU (torch.cuda.is_available() is False here); on a GPU machine run pytest -m gpu or "
    "python -m distri_core.gpucheck"))]


def test_nccl_pool_over_every_gpu_exact_and_survives_a_killed_worker():
    from distri_core.gpucheck.checks import pool_run
    from distri_core.runtime.devices import available_devices

    result = pool_run(available_devices(), model="sd15", dtypes=("fp16",), size=512, kill=True)
    assert result["status"] == "pass", result


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_two_ranks_on_one_gpu_through_gloo_equal_one_device(dtype):
    from distri_core.gpucheck.checks import pool_run

    result = pool_run(["cuda:0", "cuda:0"], backend="gloo", share_devices=True, model="sd15", dtypes=(dtype,),
                      size=512, kill=False)
    assert result["status"] == "pass", result


def test_two_ranks_on_one_gpu_need_the_explicit_test_setting():
    from distri_core.runtime.pool import PoolError, WorkerPool

    with pytest.raises(PoolError, match="cuda:0 is listed more than once"):
        WorkerPool(["cuda:0", "cuda:0"])
    with pytest.raises(PoolError, match="cuda:0 is listed more than once"):
        WorkerPool(["cuda:0", "cuda:0"], share_devices=True)  # NCCL: refused even then


def test_band_timing_with_cuda_events():
    from distri_core.gpucheck.timing import band_ceiling

    rows = band_ceiling("sd15", torch.float16, 2, sizes=(1024,), bands=(2, 4), device="cuda:0", repeats=2)
    assert [r["bands"] for r in rows] == [1, 2, 4]
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 and r["host_syncs_per_call"] is not None for r in rows)


def test_engine_calls_pass_cuda_sync_debug_mode_error():
    # Any host-device synchronisation inside the UNet call raises in this mode.
    from distri_core import zoo
    from distri_core.gpucheck.solo import solo_engine
    from distri_core.gpucheck.timing import inputs

    model = zoo.build_builtin("sd15", dtype=torch.float16, device="cuda:0")
    x, t, ctx, extra = inputs("sd15", 2, 512, torch.float16, torch.device("cuda:0"))
    engine = solo_engine(model, 2)
    try:
        with torch.inference_mode():
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):  # the register call, then displaced steps
                    engine.forward_band(x, t, ctx, **extra)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        engine.close()


def test_doctor_on_this_gpu_machine():
    from distri_core.doctor import run

    report = run(quick=True)
    assert report["verdict"]["ok"], report["verdict"]
    assert report["devices"][0].startswith("cuda")
    # mode auto's predictions for SDXL from the profile measured on these GPUs
    predicted = report["speed"]["predicted"]
    assert report["speed"]["model"] == "sdxl" and [p["size"] for p in predicted] == [1024, 2048, 4096]
    assert all(0 < p["predicted_s_per_step"] <= p["one_device_s_per_step"] * (1 + 1e-9) for p in predicted)
