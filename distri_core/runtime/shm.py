"""Shared memory between the host and its workers: files in /dev/shm (or the temp dir where
there is none), created 0600 under unguessable names and unlinked as soon as every worker has
mapped them, so nothing is left behind even if the host is killed."""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile

import torch

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
ALIGN = 64


def _prefix(pid: int | None = None) -> str:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return f"distri-{uid}-{pid if pid is not None else os.getpid()}-"


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SharedArena:
    """A mapped region; `view(offset, shape, dtype)` gives tensors on it."""

    def __init__(self, path: str, size: int, create: bool):
        self.path = path
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, max(size, 1))
            self._mm = mmap.mmap(fd, max(size, 1))
        finally:
            os.close(fd)

    @classmethod
    def create(cls, size: int) -> SharedArena:
        return cls(os.path.join(SHM_DIR, _prefix() + secrets.token_hex(16)), size, create=True)

    @classmethod
    def attach(cls, path: str, size: int) -> SharedArena:
        return cls(path, size, create=False)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=offset).view(shape)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def remove_orphans() -> list[str]:
    """Unlink segments of this user left by hosts that no longer run (killed between creating a
    segment and its workers mapping it)."""
    removed = []
    uid_prefix = _prefix(0).rsplit("-", 2)[0] + "-"
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(uid_prefix):
            continue
        try:
            pid = int(name[len(uid_prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_segments(pid: int | None = None) -> list[str]:
    """Segments of a host process still present (for tests and diagnostics)."""
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(_prefix(pid))]
    except OSError:
        return []
