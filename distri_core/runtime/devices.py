"""What the host can offer its workers: which GPUs (mapped to the physical GPU the host itself
sees under that index), and how much host memory and shared memory is free."""

from __future__ import annotations

import os

import torch

from .errors import PoolError


def available_devices() -> list[str]:
    """The host's CUDA devices as torch names it uses them ('cuda:0', ...); empty without CUDA."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


def visible_entries(value: str | None) -> list[str] | None:
    """The GPUs a CUDA_VISIBLE_DEVICES value selects, as CUDA reads it: comma-separated indices,
    'GPU-<uuid>' or 'MIG-<uuid>' entries, read up to the first invalid or repeated entry (CUDA
    ignores the rest). None when the variable is unset (every GPU, in the driver's order)."""
    if value is None:
        return None
    entries: list[str] = []
    for part in value.split(","):
        entry = part.strip()
        valid = entry.isdigit() or entry.upper().startswith(("GPU-", "MIG-"))
        if not valid or entry in entries:
            break
        entries.append(entry)
    return entries


def physical_gpu(index: int, host_visible: str | None) -> str:
    """The physical GPU (driver index or UUID) the host calls cuda:`index`.

    The host's own CUDA_VISIBLE_DEVICES (SLURM, Docker, one ComfyUI per GPU, ComfyUI's
    --cuda-device) renumbers the GPUs: with '4,5,6,7' the host's cuda:1 is physical GPU 5."""
    entries = visible_entries(host_visible)
    if entries is None:
        return str(index)
    if not 0 <= index < len(entries):
        raise PoolError(f"cuda:{index} is not visible to this process: CUDA_VISIBLE_DEVICES={host_visible!r} "
                        f"selects {len(entries)} GPU(s) (cuda:0 to cuda:{len(entries) - 1}); list only those "
                        "devices, or widen CUDA_VISIBLE_DEVICES")
    return entries[index]


def mem_available() -> int | None:
    """Bytes of host memory the kernel can give without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def dir_free(path: str) -> int | None:
    """Free bytes on the file system holding `path`, or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fmt_bytes(n: float) -> str:
    """'512 B', '64.0 MB', '10.2 GB' (decimal units, as df and Docker's --shm-size print them)."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


PHYSICAL_ENV = "DISTRI_PHYSICAL_GPU"


def worker_device(device: str, host_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The device a worker uses for the host's `device`, and the environment entries to add.

    A worker inherits the host's CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER unchanged and selects
    the host's index, so cuda:N means the same GPU in both (SLURM, Docker, --cuda-device and UUID
    lists included). Narrowing each worker to its one GPU with CUDA_VISIBLE_DEVICES would hide
    the peers from CUDA: NCCL then cannot use P2P/IPC between them, and its traffic falls back to
    host memory (or fails). The physical GPU is recorded for messages."""
    if not device.startswith("cuda"):
        return device, {}
    index = torch.device(device).index or 0
    physical = physical_gpu(index, host_env.get("CUDA_VISIBLE_DEVICES"))
    return f"cuda:{index}", {PHYSICAL_ENV: physical}
