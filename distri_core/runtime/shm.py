"""Shared memory between the host and its workers: files in /dev/shm (or $DISTRI_SHM_DIR, or the
temp dir where there is no /dev/shm), created 0600 under unguessable names and unlinked as soon
as every worker has mapped them, so nothing is left behind even if the host is killed.

Space is reserved when a segment is created (posix_fallocate): a full /dev/shm (Docker's
default is 64 MB) is a `ResourceError` that says how much is needed and how to get it, never a
SIGBUS that kills the host when it writes past what the file system can hold.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import shutil
import tempfile

import torch

from .devices import dir_free, fmt_bytes
from .errors import ResourceError

ALIGN = 64
SHM_ENV = "DISTRI_SHM_DIR"


def shm_dir() -> str:
    """Where segments live: $DISTRI_SHM_DIR, else /dev/shm, else the temp dir."""
    chosen = os.environ.get(SHM_ENV)
    if chosen:
        return chosen
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _prefix(pid: int | None = None) -> str:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return f"distri-{uid}-{pid if pid is not None else os.getpid()}-"


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def shortage_message(needed: int, directory: str, what: str) -> str:
    free = dir_free(directory)
    have = f"has {fmt_bytes(free)} free" if free is not None else "has too little free space"
    suggest = max(1, -(-int(needed * 1.25) // 10 ** 9))
    return (f"{what} needs {fmt_bytes(needed)} of shared memory in {directory}, which {have}. In Docker, start "
            f"the container with a larger --shm-size (e.g. --shm-size={suggest}g); elsewhere enlarge that tmpfs, "
            f"or set {SHM_ENV} to a directory on a larger tmpfs or disk")


class SharedArena:
    """A mapped region; `view(offset, shape, dtype)` gives tensors on it."""

    def __init__(self, path: str, size: int, create: bool, what: str = "a transfer"):
        self.path = path
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, max(size, 1))  # reserve now: no SIGBUS on write later
                except OSError as e:
                    os.unlink(path)
                    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                        raise ResourceError(shortage_message(size, os.path.dirname(path), what)) from None
                    raise
            self._mm = mmap.mmap(fd, max(size, 1))
        finally:
            os.close(fd)

    @classmethod
    def create(cls, size: int, what: str = "a transfer") -> SharedArena:
        return cls(os.path.join(shm_dir(), _prefix() + secrets.token_hex(16)), size, create=True, what=what)

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


def store_dir() -> str:
    """A private directory for the workers' rendezvous store; it lives as long as the workers
    (NCCL creates communicators lazily and needs the store then), and `remove_orphans` removes
    it once its host is gone."""
    return tempfile.mkdtemp(prefix="distri-store-" + _prefix().removeprefix("distri-"))


def remove_orphans() -> list[str]:
    """Unlink segments and store directories of this user left by hosts that no longer run
    (killed between creating a segment and its workers mapping it)."""
    removed = []
    uid_prefix = _prefix(0).rsplit("-", 2)[0] + "-"
    store_prefix = "distri-store-" + uid_prefix.removeprefix("distri-")
    for directory, prefix in ((shm_dir(), uid_prefix), (tempfile.gettempdir(), store_prefix)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not name.startswith(prefix):
                continue
            try:
                pid = int(name[len(prefix):].split("-", 1)[0])
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            path = os.path.join(directory, name)
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
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
    """Segments and store directories of a host process still present (tests, diagnostics)."""
    found = []
    store_prefix = "distri-store-" + _prefix(pid).removeprefix("distri-")
    for directory, prefix in ((shm_dir(), _prefix(pid)), (tempfile.gettempdir(), store_prefix)):
        try:
            found += [n for n in os.listdir(directory) if n.startswith(prefix)]
        except OSError:
            pass
    return found
