"""One measurement per GPU at a time, across processes: an advisory flock on a per-GPU file.

Two measurements sharing a GPU would spoil each other's latency and, worse, energy (the counter is
per device). The lock file lives in `$ETUNE_LOCK_DIR`, else `$XDG_RUNTIME_DIR`, else /tmp. The
holder writes its PID into the file so that a refused process can say who holds the GPU. The
kernel drops a flock when its holder dies, so a crashed run never leaves the GPU locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

LOCK_DIR_ENV = "ETUNE_LOCK_DIR"


class GpuBusyError(RuntimeError):
    """Another process holds the GPU's lock (and `wait=False`, or the timeout ran out)."""

    def __init__(self, index: int, path: Path, holder_pid: int | None, waited_s: float | None):
        self.index, self.path, self.holder_pid, self.waited_s = index, path, holder_pid, waited_s
        holder = f"PID {holder_pid}" if holder_pid is not None else "a process whose PID is unknown"
        waited = f" after waiting {waited_s:.1f} s" if waited_s is not None else ""
        super().__init__(f"GPU {index} is busy{waited}: {holder} holds {path}")


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or os.environ.get("XDG_RUNTIME_DIR") or "/tmp")


def lock_path(index: int = 0) -> Path:
    return lock_dir() / f"etune-gpu-{index}.lock"


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:  # empty: the holder has not written its PID yet, or is releasing
        return None


class GpuLock:
    """`with GpuLock(0):` holds GPU 0 for the block.

    wait=True blocks until the GPU is free (at most `timeout` seconds when given, then raises
    GpuBusyError); wait=False raises GpuBusyError at once if it is held.
    """

    def __init__(self, index: int = 0, *, wait: bool = True, timeout: float | None = None,
                 poll_s: float = 0.05, path: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.index = index
        self.wait = wait
        self.timeout = timeout
        self.poll_s = poll_s
        self.path = Path(path) if path is not None else lock_path(index)
        self._clock, self._sleep = clock, sleep
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "GpuLock":
        if self._fd is not None:
            raise RuntimeError(f"GPU {self.index} lock is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a subprocess we start must not inherit (and so keep) the lock after we die.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            self._lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the flock too, if we got it
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        if self.wait and self.timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        start = self._clock()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            waited = self._clock() - start
            if not self.wait or waited >= self.timeout:
                raise GpuBusyError(self.index, self.path, _read_pid(fd),
                                   waited if self.wait else None)
            self._sleep(min(self.poll_s, self.timeout - waited))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # before unlocking, so nobody ever reads a stale PID
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "GpuLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
