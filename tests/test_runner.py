"""The isolated runner with CPU tasks that raise, crash and hang (no GPU needed)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from etune.measurements.runner import IsolatedRunner, TaskResult, describe_exit, last_line


# Tasks: module-level, so the spawned worker can import them by reference.
def add(a, b):
    return a + b


def pid():
    return os.getpid()


def raise_value_error():
    raise ValueError("first line\nbad input: 42")


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)


def exit_3():
    os._exit(3)


def hang(seconds):
    time.sleep(seconds)
    return "woke up"


def unpicklable_result():
    import threading

    return threading.Lock()


@pytest.fixture
def runner():
    with IsolatedRunner(timeout_s=30) as r:
        yield r


def test_results_in_order_in_one_long_lived_worker(runner):
    results = runner.map(add, [(1, 2), (3, 4), ("a", "b")])
    assert [r.value for r in results] == [3, 7, "ab"]
    assert all(r.ok and r.status == "ok" for r in results)
    pids = {runner.run(pid).value for _ in range(3)}
    assert len(pids) == 1 and pids != {os.getpid()}
    assert runner.restarts == 0


def test_exception_is_a_failed_result_and_the_worker_stays(runner):
    first = runner.run(pid).value
    result = runner.run(raise_value_error)
    assert result.status == "error" and not result.ok
    assert result.error == "ValueError: bad input: 42"
    assert "raise_value_error" in result.traceback
    assert runner.run(pid).value == first
    assert runner.run(add, (1, 1)).value == 2


def test_restart_after_error_replaces_the_worker():
    with IsolatedRunner(timeout_s=30, restart_after_error=True) as runner:
        first = runner.run(pid).value
        assert runner.run(raise_value_error).status == "error"
        second = runner.run(pid)
        assert second.ok and second.value != first
        assert runner.restarts == 1


def test_segfault_is_reported_and_the_next_task_runs_in_a_fresh_worker(runner):
    first = runner.run(pid).value
    result = runner.run(segfault)
    assert result.status == "crashed"
    assert result.error == "worker crashed (signal 11, SIGSEGV)"
    assert result.worker_pid == first
    after = runner.run(pid)
    assert after.ok and after.value != first
    assert runner.run(add, (2, 3)).value == 5
    assert runner.restarts == 1


def test_os_exit_is_reported(runner):
    result = runner.run(exit_3)
    assert result.status == "crashed" and result.error == "worker exited with status 3"
    assert runner.run(add, (1, 2)).value == 3


def test_hang_times_out_and_the_worker_is_replaced(runner):
    first = runner.run(pid).value
    started = time.perf_counter()
    result = runner.run(hang, (60,), timeout_s=1)
    elapsed = time.perf_counter() - started
    assert result.status == "timeout" and result.error == "timed out after 1 s"
    assert 1.0 <= elapsed < 6.0
    # The hung worker is gone, not left sleeping.
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(first, 0)
            time.sleep(0.1)
    assert runner.run(hang, (0.01,), timeout_s=10).value == "woke up"
    assert runner.run(pid).value != first


def test_time_out_is_not_hit_by_a_task_within_it(runner):
    result = runner.run(hang, (0.5,), timeout_s=5)
    assert result.ok and result.value == "woke up" and 0.5 <= result.seconds < 5


def test_mixed_batch_keeps_order(runner):
    tasks = [(add, (1, 1)), (exit_3, ()), (add, (2, 2)), (raise_value_error, ()), (add, (3, 3))]
    results = [runner.run(fn, args) for fn, args in tasks]
    assert [r.status for r in results] == ["ok", "crashed", "ok", "error", "ok"]
    assert [r.value for r in results if r.ok] == [2, 4, 6]


def test_close_terminates_the_worker():
    runner = IsolatedRunner(timeout_s=30)
    worker = runner.run(pid).value
    runner.close()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(worker, 0)
            time.sleep(0.1)
    with pytest.raises(RuntimeError):
        runner.run(pid)


def test_a_result_that_cannot_be_sent_back_is_an_error(runner):
    result = runner.run(unpicklable_result)
    assert result.status == "error" and "pickle" in result.error
    assert runner.run(add, (1, 2)).value == 3


def test_helpers():
    assert describe_exit(-9) == "worker crashed (signal 9, SIGKILL)"
    assert describe_exit(2) == "worker exited with status 2"
    assert last_line(RuntimeError("Traceback...\n  at foo\nCUDA: illegal address")) == \
        "RuntimeError: CUDA: illegal address"
    assert last_line(KeyError()) == "KeyError"
    assert TaskResult("ok", 1).ok and not TaskResult("timeout").ok
