"""The per-GPU cross-process lock, exercised with a second process holding it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from etune.measurements.gpu_lock import LOCK_DIR_ENV, GpuBusyError, GpuLock, lock_path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Holds GPU <argv[1]> until a line arrives on stdin (or it is killed).
HOLDER = textwrap.dedent("""
    import os, sys
    from etune.measurements.gpu_lock import GpuLock

    with GpuLock(int(sys.argv[1]), wait=False):
        print("held", os.getpid(), flush=True)
        sys.stdin.readline()
    print("released", flush=True)
""")


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path))
    return tmp_path


class Holder:
    def __init__(self, index: int = 0):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(index)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
        word, pid = self.proc.stdout.readline().split()
        assert word == "held" and int(pid) == self.proc.pid

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def holder():
    h = Holder()
    yield h
    h.stop()


def test_lock_path_honours_environment(monkeypatch, lock_dir):
    assert lock_path(3) == lock_dir / "etune-gpu-3.lock"
    monkeypatch.delenv(LOCK_DIR_ENV)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert lock_path(0) == Path("/run/user/1234/etune-gpu-0.lock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert lock_path(0) == Path("/tmp/etune-gpu-0.lock")


def test_no_wait_names_the_holder(holder):
    with pytest.raises(GpuBusyError) as info:
        GpuLock(0, wait=False).acquire()
    assert info.value.holder_pid == holder.proc.pid
    assert f"PID {holder.proc.pid}" in str(info.value)
    assert "GPU 0 is busy" in str(info.value)


def test_wait_with_timeout_gives_up(holder):
    start = time.monotonic()
    with pytest.raises(GpuBusyError, match="after waiting"):
        GpuLock(0, wait=True, timeout=0.3, poll_s=0.02).acquire()
    assert time.monotonic() - start >= 0.3


@pytest.mark.parametrize("timeout", [None, 10.0])
def test_wait_blocks_until_released(holder, timeout):
    releaser = threading.Timer(0.3, holder.release)
    releaser.start()
    start = time.monotonic()
    try:
        with GpuLock(0, wait=True, timeout=timeout, poll_s=0.02) as lock:
            assert lock.held
            assert time.monotonic() - start >= 0.25
            assert lock.path.read_text().strip() == str(os.getpid())
    finally:
        releaser.join()
    assert not lock.held and lock.path.read_text() == ""


def test_killed_holder_frees_the_gpu(holder):
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    with GpuLock(0, wait=False):
        pass


def test_other_gpus_are_independent(holder):
    with GpuLock(1, wait=False):
        pass


def test_released_on_exception_and_reusable():
    with pytest.raises(KeyError):
        with GpuLock(0, wait=False):
            raise KeyError("boom")
    h = Holder()  # another process can take it now
    try:
        with pytest.raises(GpuBusyError):
            GpuLock(0, wait=False).acquire()
    finally:
        h.release()
