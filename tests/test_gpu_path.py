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


def test_gpu_outside_the_host_visible_set_is_refused_by_name():
    assert visible_entries("3,1,-1,0") == ["3", "1"]
    assert visible_entries("0,0,1") == ["0"]  # a repeated entry ends the list, as CUDA does
    assert visible_entries("") == []
    with pytest.raises(PoolError, match=r"cuda:2 is not visible to this process: CUDA_VISIBLE_DEVICES='3,1,-1,0' "
                                        r"selects 2 GPU\(s\)"):
        physical_gpu(2, "3,1,-1,0")
