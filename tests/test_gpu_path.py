"""The GPU path's failure modes, imitated on CPU ranks where they can be (each test names the GPU
behaviour it stands for, and why CPU and gloo alone would not show it)."""

from __future__ import annotations

import os

import pytest
import tasks

from distri_core.runtime.devices import physical_gpu, visible_entries
from distri_core.runtime.errors import PoolError
from distri_core.runtime.launch import LocalCluster


def test_groups_created_after_ready_still_find_the_rendezvous_store():
    # NCCL creates a communicator at its first collective and needs the rendezvous store then;
    # gloo connects when a group is created. A sub-world's groups are created here after every
    # worker said "ready": with the store deleted at "ready" (the old pool), this fails on gloo
    # exactly as the first NCCL all-gather did.
    with LocalCluster(3) as cluster:
        store = cluster._workers._store
        assert store and os.path.isdir(store)
        assert cluster.run(tasks.group_sum, size=2) == [3.0, 3.0]
        assert cluster.run(tasks.group_sum, size=3) == [6.0, 6.0, 6.0]
    assert not os.path.exists(store)  # removed with the workers


@pytest.mark.parametrize("visible, index, expected", [
    (None, 0, "0"), (None, 3, "3"),  # unset: every GPU, the host's indices are physical
    ("4,5,6,7", 0, "4"), ("4,5,6,7", 3, "7"),  # SLURM / Docker / one ComfyUI per GPU
    ("2", 0, "2"),  # ComfyUI --cuda-device 2 sets CUDA_VISIBLE_DEVICES=2 at start-up
    (" 1, 0 ", 1, "0"),
    ("GPU-8f6a1b2c-aaaa-bbbb-cccc-000000000001,GPU-8f6a1b2c-aaaa-bbbb-cccc-000000000002", 1,
     "GPU-8f6a1b2c-aaaa-bbbb-cccc-000000000002"),
    ("MIG-5c2b0d4e-1111-2222-3333-444455556666", 0, "MIG-5c2b0d4e-1111-2222-3333-444455556666"),
    ("3,1,-1,0", 1, "1"),  # CUDA reads up to the first invalid entry
])
def test_worker_gpu_is_the_physical_gpu_the_host_means(visible, index, expected):
    assert physical_gpu(index, visible) == expected


def test_workers_keep_the_host_gpu_numbering_and_see_their_peers():
    # The old pool gave each worker CUDA_VISIBLE_DEVICES=<the host's logical index>: with the host
    # on '4,5,6,7' its cuda:1 worker ran on physical GPU 1, someone else's. Workers now inherit the
    # host's CUDA_VISIBLE_DEVICES and select the same index (and still see their peers, which NCCL
    # needs for P2P/IPC); the physical GPU is only recorded, for messages.
    from distri_core.runtime.devices import PHYSICAL_ENV, worker_device

    assert worker_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ("cuda:1", {PHYSICAL_ENV: "5"})
    assert worker_device("cuda:0", {}) == ("cuda:0", {PHYSICAL_ENV: "0"})
    assert worker_device("cpu", {"CUDA_VISIBLE_DEVICES": "4"}) == ("cpu", {})
    with pytest.raises(PoolError, match="cuda:1 is not visible to this process"):
        worker_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "3"})


def test_gpu_outside_the_host_visible_set_is_refused_by_name():
    assert visible_entries("3,1,-1,0") == ["3", "1"]
    assert visible_entries("0,0,1") == ["0"]  # a repeated entry ends the list, as CUDA does
    assert visible_entries("") == []
    with pytest.raises(PoolError, match=r"cuda:2 is not visible to this process: CUDA_VISIBLE_DEVICES='3,1,-1,0' "
                                        r"selects 2 GPU\(s\)"):
        physical_gpu(2, "3,1,-1,0")


@pytest.mark.parametrize("bucket_bytes", [16 << 10, 8 << 20])
def test_first_call_never_holds_its_stale_state_twice(cluster, bucket_bytes):
    # On a GPU the first call of each stale key sets the memory peak that decides an OOM at
    # 4096^2. Buckets are allocated at their final size as they fill, so the peak is the stale
    # state plus at most one bucket's worth of kept exchanges (it used to be twice the state).
    for peak, held, buckets in cluster.run(tasks.stale_memory, bucket_bytes, size=2):
        assert held > 0 and buckets >= 1
        largest_entry = 2 * 48 * 40 * 32 * 4 * 2  # K and V of the top-level attention, both ranks
        assert peak <= held + 2 * (bucket_bytes + largest_entry), (peak, held, buckets)
        if bucket_bytes < held // 8:
            assert peak < 1.35 * held, (peak, held, buckets)


def test_an_nccl_start_up_failure_says_what_to_try():
    # NCCL fails at communicator set-up (now at start-up) when a container's /dev/shm is small or
    # a consumer card's P2P is broken; its own message names neither fix.
    from distri_core.runtime.errors import WorkerError
    from distri_core.runtime.pool import with_nccl_hint

    failed = WorkerError(1, "cuda:1", 42, "DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled "
                         "system error (run with NCCL_DEBUG=INFO for details)")
    hinted = with_nccl_hint(failed, "nccl")
    assert "--shm-size" in str(hinted) and "NCCL_P2P_DISABLE=1" in str(hinted) and hinted.rank == 1
    assert with_nccl_hint(failed, "gloo") is failed
    other = WorkerError(0, "cuda:0", 7, "ModuleNotFoundError: No module named 'x'")
    assert with_nccl_hint(other, "nccl") is other


# -- weights: bounded chunks, checked room, no SIGBUS ---------------------------------------------

def test_gpu_style_weights_stream_through_two_bounded_segments(monkeypatch):
    # GPU ranks copy their weights into device memory. They stream through two segments of
    # chunk_bytes (weights larger than a chunk span several), so the host never holds a second
    # full copy of the model; run here on CPU ranks that copy, with chunks far below the model's
    # 4.2 MB so every piece of the protocol is used.
    import pool_models
    import torch

    from distri_core import PatchParallelConfig
    from distri_core.runtime import shipping
    from distri_core.runtime.pool import WorkerPool

    created = []
    real_create = shipping.SharedArena.create

    def spy(size, what="a transfer"):
        if "weights" in what:
            created.append(size)
        return real_create(size, what)

    monkeypatch.setattr(shipping.SharedArena, "create", spy)
    chunk = 128 << 10
    with WorkerPool(["cpu", "cpu"], weights="chunked", chunk_bytes=chunk) as pool:
        pool.configure(PatchParallelConfig(world_size=2, mode="full_sync"))
        pool.load_model("micro", pool_models.micro_spec(), pool_models.micro_weights)
        x, t, ctx, _ = tasks.inputs("diffusers", "micro", 2, 48, 40)
        assert (pool(x, t, ctx) - pool_models.micro_reference(x, t, ctx)).abs().max() < 1e-4
    assert len(created) == 2 and max(created) <= chunk
    assert sum(torch.numel(v) * v.element_size() for v in pool_models.micro_weights().values()) > 20 * chunk


def test_a_model_that_cannot_fit_is_refused_before_anything_is_written():
    import torch

    from distri_core import PatchParallelConfig
    from distri_core.runtime.errors import ResourceError
    from distri_core.runtime.pool import LazyWeights, ModelSpec, WorkerPool

    huge = LazyWeights([("w", (1 << 20, 1 << 20), torch.float32)], get=lambda name: pytest.fail("no weight is read"))
    with WorkerPool(["cpu", "cpu"]) as pool:
        pool.configure(PatchParallelConfig(world_size=2))
        with pytest.raises(ResourceError, match=r"needs 4398046\.5 MB|needs 4398\.0 GB"):
            pool.load_model("huge", ModelSpec("torch.nn:Identity"), huge)
        assert pool.state == "ready"


SMALL_SHM_HOST = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import pool_models, tasks
from distri_core import PatchParallelConfig
from distri_core.runtime.errors import ResourceError
from distri_core.runtime.pool import WorkerPool
from distri_core.runtime.shm import SharedArena
try:
    SharedArena.create(3 << 20, "a test segment")
except ResourceError as e:
    print("ARENA:", e)
with WorkerPool(["cpu", "cpu"]) as pool:  # CPU ranks share one 4.2 MB copy: cannot fit in 2 MB
    pool.configure(PatchParallelConfig(world_size=2, mode="full_sync"))
    try:
        pool.load_model("m", pool_models.micro_spec(), pool_models.micro_weights)
    except ResourceError as e:
        print("SHARED:", e)
with WorkerPool(["cpu", "cpu"], weights="chunked", chunk_bytes=256 << 10) as pool:
    pool.configure(PatchParallelConfig(world_size=2, mode="full_sync"))
    pool.load_model("m", pool_models.micro_spec(), pool_models.micro_weights)
    x, t, ctx, _ = tasks.inputs("diffusers", "micro", 1, 16, 16)
    out = pool(x, t, ctx)
    ref = pool_models.micro_reference(x, t, ctx)
    print("CHUNKED:", float((out - ref).abs().max()))
"""


def test_small_dev_shm_is_a_clear_error_not_a_sigbus(tmp_path):
    # Docker gives containers a 64 MB /dev/shm. Writing past what a tmpfs holds through an mmap
    # is a SIGBUS that kills the whole ComfyUI process; here a 2 MB tmpfs (a private mount
    # namespace, no privileges needed) stands in for it.
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux's unshare to mount a small private tmpfs")
    shm = tmp_path / "shm"
    shm.mkdir()
    script = tmp_path / "host.py"
    root = Path(__file__).resolve().parents[1]
    script.write_text(SMALL_SHM_HOST.format(root=str(root), tests=str(Path(__file__).parent)))
    probe = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this kernel refuses a private mount namespace: {probe.stderr.decode().strip()}")
    cmd = (f"mount -t tmpfs -o size=2m tmpfs {shm} && DISTRI_SHM_DIR={shm} exec {sys.executable} {script}")
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", cmd], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    for key in ("ARENA", "SHARED"):
        assert f"of shared memory in {shm}, which has" in lines[key], done.stdout
        assert "--shm-size=" in lines[key] and "DISTRI_SHM_DIR" in lines[key], done.stdout
    assert float(lines["CHUNKED"]) < 1e-4, done.stdout


def test_control_residuals_cross_to_the_device_cut_to_the_band():
    # ControlNet residuals are image-sized at every level; a worker cuts them to its band while
    # they are still in host memory, so only the band is copied to its GPU (it used to copy the
    # whole image's residuals and cut them there). Counted on CPU ranks as the bytes handed to
    # the compute device.
    import pool_models
    import torch

    from distri_core import PatchParallelConfig
    from distri_core.runtime.pool import WorkerPool

    x, t, ctx, _ = tasks.inputs("diffusers", "micro", 2, 48, 40)
    g = torch.Generator().manual_seed(1)
    down = tuple(torch.randn(2, c, h, w, generator=g) for c, h, w in ((32, 48, 40), (32, 48, 40), (32, 24, 20),
                                                                     (64, 24, 20)))
    mid = torch.randn(2, 64, 24, 20, generator=g)
    control_bytes = sum(r.numel() * 4 for r in (*down, mid))
    with WorkerPool(["cpu", "cpu"]) as pool:
        pool.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=False))
        pool.load_model("micro", pool_models.micro_spec(), pool_models.micro_weights)
        out = pool(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        moved = pool.last_call["input_bytes"]
    with torch.inference_mode():
        ref = pool_models.micro_reference_with(x, t, ctx, down_block_additional_residuals=down,
                                               mid_block_additional_residual=mid)
    assert (out - ref).abs().max() < 1e-4
    others = x.numel() * 4 + ctx.numel() * 4 + t.numel() * 4
    for rank_bytes in moved:
        assert rank_bytes <= others + control_bytes // 2 + 1024, (moved, control_bytes)


# -- cancel: control back within 2 seconds in every state ------------------------------------------

CANCEL_BOUND_S = 3.0  # the design gives 1.5 s of grace plus a kill; the rest is slack for a busy box


class Flag:
    """ComfyUI's interrupt flag as the pool sees it: a callable that turns true."""

    def __init__(self):
        import threading

        self.event = threading.Event()
        self.set_at = None

    def __call__(self) -> bool:
        return self.event.is_set()

    def set_after(self, seconds: float) -> None:
        import threading
        import time

        def fire():
            self.set_at = time.monotonic()
            self.event.set()

        threading.Timer(seconds, fire).start()


@pytest.fixture
def cancel_pool():
    import pool_models

    with pool_models.micro_pool("micro") as pool:
        yield pool


def _next_run_works(pool):
    import pool_models

    from distri_core import PatchParallelConfig

    pool.interrupt_check = None
    pool.load_model("micro", pool_models.micro_spec(), pool_models.micro_weights)
    pool.configure(PatchParallelConfig(world_size=2, mode="full_sync", cfg_split=False))
    x, t, ctx, _ = tasks.inputs("diffusers", "micro", 1, 16, 16)
    assert (pool(x, t, ctx) - pool_models.micro_reference(x, t, ctx)).abs().max() < 1e-4


def _expect_cancel(pool, flag, action):
    import time

    from distri_core.runtime.errors import Cancelled

    pool.interrupt_check = flag
    with pytest.raises(Cancelled) as e:
        action()
    returned = time.monotonic()
    assert flag.set_at is not None and returned - flag.set_at < CANCEL_BOUND_S, returned - flag.set_at
    return e.value


def test_cancel_reaches_a_worker_stuck_in_a_collective(cancel_pool):
    # A rank that never reaches the collective (a hung GPU, a stopped process) leaves its peers
    # blocked inside NCCL for its 600 s timeout: the host must not wait for them.
    import signal
    import time

    from comfy_server import still_alive

    pids = [w["pid"] for w in cancel_pool.status()["workers"]]
    os.kill(pids[1], signal.SIGSTOP)
    flag = Flag()
    flag.set_after(0.5)
    x, t, ctx, _ = tasks.inputs("diffusers", "micro", 1, 48, 40)
    try:
        err = _expect_cancel(cancel_pool, flag, lambda: cancel_pool(x, t, ctx))
    finally:
        time.sleep(0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert not err.kept and cancel_pool.state == "broken"
    assert not still_alive(pids, 5)  # no orphan
    _next_run_works(cancel_pool)


def test_cancel_during_a_long_call_keeps_or_restarts_the_pool(cancel_pool):
    x, t, ctx, _ = tasks.inputs("diffusers", "micro", 2, 256, 256)
    flag = Flag()
    flag.set_after(0.3)
    err = _expect_cancel(cancel_pool, flag, lambda: cancel_pool(x, t, ctx))
    assert cancel_pool.state == ("ready" if err.kept else "broken")
    _next_run_works(cancel_pool)


def test_cancel_during_weight_shipping_and_during_start(cancel_pool):
    import pool_models

    flag = Flag()
    flag.set_after(0.0)
    slow = pool_models.slow_weights(0.05)  # about 14 s for the whole model unless cancelled
    _expect_cancel(cancel_pool, flag, lambda: cancel_pool.load_model("slow", pool_models.micro_spec(), slow))
    assert cancel_pool.model_key is None  # a half-shipped model is never used
    _next_run_works(cancel_pool)
    cancel_pool.close()
    flag = Flag()
    flag.set_after(0.5)  # workers take longer than that to import torch
    _expect_cancel(cancel_pool, flag, cancel_pool.start)
    assert cancel_pool.state in ("broken", "stopped") and not cancel_pool.status()["workers"]
    _next_run_works(cancel_pool)


def test_self_attention_follows_comfyui_attention_and_its_precision(cluster, comfy_root):
    # ComfyUI picks one attention kernel per device and flags (SDPA, sage, flash, split...) and
    # passes each layer's attn_precision to it: SD2.x asks for float32, which ComfyUI's SDPA path
    # does not upcast. The band's self-attention (queries of the band, keys of the whole image)
    # must call that same function with the same precision, or full_sync drifts from KSampler in
    # fp16 and loses the fused kernel on a GPU.
    for rank, (calls, result) in enumerate(cluster.run(tasks.attention_calls, str(comfy_root), size=2)):
        band_calls = [c for c in calls if c[1] > c[0]]  # more keys than queries: a band's attn1
        assert band_calls, calls
        assert all(c[2] == "torch.float32" for c in band_calls), band_calls
        if rank == 0:
            assert max(result["errors"]) < 1e-4, result
