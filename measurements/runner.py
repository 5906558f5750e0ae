"""Run tasks in a long-lived worker process that may die: the isolated runner.

A kernel under test can take its process down (a segfault in a driver, an illegal address that kills
the CUDA context and aborts on teardown) or never finish (a hang). Neither may stop a tuning run or
poison the next measurement, so every task runs in a worker process:

- tasks run one at a time, in order, each with a time-out;
- a task that raises gives a failed `TaskResult` with the exception's last line;
- a worker that dies (signal, `os._exit`) or a task that exceeds its time-out gives a failed result
  saying so ("worker crashed (signal 11, SIGSEGV)", "timed out after 10 s"); the worker is killed if
  needed and the next task starts a fresh one;
- with ``restart_after_error=True`` a worker is also replaced after a task raised, for state that an
  exception can leave broken (a CUDA context after an illegal memory access is unusable, although
  the process lives on).

The worker stays alive between tasks, so what is expensive to set up (imports, a CUDA context, a
workload's inputs and reference outputs cached in module globals) is paid once per worker.

Workers are started with multiprocessing's "spawn" context (a fresh interpreter, never a fork of a
process that may hold a CUDA context). Tasks and their arguments are serialised with cloudpickle, so
a task is best a module-level function; results must be picklable. Nothing here knows about GPUs.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterable, Sequence

import cloudpickle

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class TaskResult:
    """What became of one task. ``status``: ok | error (it raised) | crashed (the worker died) |
    timeout. ``value`` is the task's return value when ok; ``error`` one readable line otherwise."""

    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    worker_pid: int | None = None
    traceback: str | None = None  # the worker's traceback when the task raised

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def last_line(exc: BaseException) -> str:
    """``TypeName: last non-empty line of the message`` (TVM errors carry whole tracebacks)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    line = lines[-1]
    return line if line.startswith(name) else f"{name}: {line}"


def describe_exit(exitcode: int | None) -> str:
    """Why a worker process ended, for a human."""
    if exitcode is None:
        return "worker died"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = None
        return f"worker crashed (signal {-exitcode}{', ' + name if name else ''})"
    return f"worker exited with status {exitcode}"


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}" if seconds >= 1 else f"{seconds:.3g}"


# -- the worker side -------------------------------------------------------------------------------
def _worker_main(conn) -> None:
    """Loop in the worker: receive a task, run it, send back ("ok", value) or ("error", line, tb)."""
    # Ctrl-C in a terminal goes to the whole process group; the parent decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        try:
            fn, args, kwargs = cloudpickle.loads(message)
            reply = ("ok", fn(*args, **kwargs))
            payload = cloudpickle.dumps(reply)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            payload = cloudpickle.dumps(("error", last_line(exc), traceback.format_exc()))
        try:
            conn.send_bytes(payload)
        except (BrokenPipeError, OSError):
            return


# -- the parent side -------------------------------------------------------------------------------
class _Worker:
    def __init__(self, context):
        parent_conn, child_conn = context.Pipe(duplex=True)
        # daemon: multiprocessing kills it when the parent exits, so no orphan keeps a GPU context.
        self.process = context.Process(target=_worker_main, args=(child_conn,), daemon=True,
                                       name="etune-runner-worker")
        self.process.start()
        child_conn.close()  # only the child holds its end now, so its death reads as EOF here
        self.conn = parent_conn

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def stop(self, grace_s: float = 2.0) -> None:
        """Ask the worker to leave (close its pipe), then terminate, then kill."""
        try:
            self.conn.close()
        except OSError:
            pass
        self.process.join(grace_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(grace_s)

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)


def _close_worker(holder: list) -> None:
    if holder and holder[0] is not None:
        holder[0].stop(grace_s=1.0)
        holder[0] = None


class IsolatedRunner:
    """``with IsolatedRunner() as runner: result = runner.run(fn, args, timeout_s=10)``.

    One worker process, started on the first task and replaced whenever it dies, hangs, or (with
    ``restart_after_error``) its task raises. ``restarts`` counts replacements.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, *, restart_after_error: bool = False,
                 start_method: str = "spawn"):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s = float(timeout_s)
        self.restart_after_error = restart_after_error
        self._context = multiprocessing.get_context(start_method)
        self._holder: list[_Worker | None] = [None]  # a list so the finalizer need not hold self
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0
        self.tasks_run = 0
        self._finalizer = weakref.finalize(self, _close_worker, self._holder)

    @property
    def worker_pid(self) -> int | None:
        worker = self._holder[0]
        return worker.pid if worker is not None and worker.process.is_alive() else None

    def _worker(self) -> _Worker:
        worker = self._holder[0]
        if worker is not None and not worker.process.is_alive():
            self._discard(worker, kill=False)
            worker = None
        if worker is None:
            worker = _Worker(self._context)
            self._holder[0] = worker
            log.debug("runner worker started: PID %s", worker.pid)
        return worker

    def _discard(self, worker: _Worker, kill: bool) -> None:
        if kill:
            worker.kill()
        else:
            worker.stop(grace_s=1.0)
        if self._holder[0] is worker:
            self._holder[0] = None
        self.restarts += 1

    def run(self, fn: Callable, args: Sequence = (), kwargs: dict | None = None,
            timeout_s: float | None = None) -> TaskResult:
        """Run ``fn(*args, **kwargs)`` in the worker; never raises for the task's own failure."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if timeout <= 0:
            raise ValueError("timeout_s must be > 0")
        payload = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})))
        with self._lock:
            if self._closed:
                raise RuntimeError("IsolatedRunner is closed")
            self.tasks_run += 1
            worker = self._worker()
            pid = worker.pid
            started = time.perf_counter()
            try:
                worker.conn.send_bytes(payload)
            except (BrokenPipeError, OSError):  # died between tasks
                worker.process.join(1.0)
                reason = describe_exit(worker.process.exitcode)
                self._discard(worker, kill=True)
                return TaskResult("crashed", error=reason, seconds=time.perf_counter() - started,
                                  worker_pid=pid)
            try:
                ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel], timeout)
                seconds = time.perf_counter() - started
                reply = None
                if worker.conn in ready:
                    try:
                        reply = cloudpickle.loads(worker.conn.recv_bytes())
                    except (EOFError, OSError):
                        reply = None  # it died while (or instead of) answering
            except BaseException as exc:
                # Interrupted (Ctrl-C) or an unreadable result: the worker's state and the pipe are no
                # longer known to be in step, so this worker goes; a late reply must never be read as
                # the answer to the next task.
                self._discard(worker, kill=True)
                if not isinstance(exc, Exception):
                    raise
                return TaskResult("error", error=f"cannot read the task's result: {last_line(exc)}",
                                  seconds=time.perf_counter() - started, worker_pid=pid)
            if worker.conn in ready:
                if reply is not None:
                    if reply[0] == "ok":
                        return TaskResult("ok", value=reply[1], seconds=seconds, worker_pid=pid)
                    if self.restart_after_error:
                        self._discard(worker, kill=False)
                    return TaskResult("error", error=reply[1], seconds=seconds, worker_pid=pid,
                                      traceback=reply[2])
            if not ready:
                self._discard(worker, kill=True)
                log.warning("task %s timed out after %s s; worker %s killed", getattr(fn, "__name__", fn),
                            _format_seconds(timeout), pid)
                return TaskResult("timeout", error=f"timed out after {_format_seconds(timeout)} s",
                                  seconds=seconds, worker_pid=pid)
            # The worker died: reap it to learn how.
            worker.process.join(5.0)
            reason = describe_exit(worker.process.exitcode)
            self._discard(worker, kill=True)
            log.warning("task %s: %s", getattr(fn, "__name__", fn), reason)
            return TaskResult("crashed", error=reason, seconds=seconds, worker_pid=pid)

    def map(self, fn: Callable, arg_tuples: Iterable[Sequence], timeout_s: float | None = None,
            progress: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
        """One result per argument tuple, in order; one task at a time."""
        results = []
        for args in arg_tuples:
            result = self.run(fn, args, timeout_s=timeout_s)
            if progress is not None:
                progress(result)
            results.append(result)
        return results

    def close(self) -> None:
        """Stop the worker (ask, then terminate, then kill); the runner cannot be used afterwards."""
        with self._lock:
            self._closed = True
            _close_worker(self._holder)
            self._finalizer.detach()

    def __enter__(self) -> "IsolatedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
