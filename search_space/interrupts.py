"""Ctrl-C (and SIGTERM) that always stop a tuning run.

A KeyboardInterrupt raised inside a TVM callback does not come back as one: TVM's FFI hands it back
as a RuntimeError with an empty message, which the schedule space takes for an invalid candidate,
and the run goes on. One raised inside a ctypes callback (XGBoost's data iterator) is printed with a
traceback and dropped. So within ``stop_on(...)`` a signal also leaves a note here, the code that
swallows TVM's errors calls ``check()``, which raises KeyboardInterrupt once a signal was noted, the
tuner checks at every step and takes any error after the note for the interrupt; what Python could
only print after it (the dropped interrupt, objects it left half-made) is not printed.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_received: int | None = None  # the signal noted, until the stop_on that installed the handler ends


def _note_and_interrupt(signum, frame) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt


@contextmanager
def stop_on(*signums: int) -> Iterator[None]:
    """Within the block, each of the signals raises KeyboardInterrupt (as SIGINT does by default) and is
    noted for ``check()``. A signal whose handler someone else set is left alone, and off the main
    thread (where Python runs no signal handler) nothing is installed."""
    global _received
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                installed[signum] = signal.signal(signum, _note_and_interrupt)
    hook = sys.unraisablehook

    def unraisable(what) -> None:
        # Once a signal was noted, what Python can only print is the interrupt's own doing: our
        # KeyboardInterrupt, which a ctypes callback could not raise (check() raises it again at the
        # next step), or an object it left half-made, whose __del__ then fails (XGBoost's DataIter).
        if _received is None:
            hook(what)

    if installed:
        sys.unraisablehook = unraisable
    try:
        yield
    finally:
        for signum, handler in installed.items():
            signal.signal(signum, handler)
        if installed:
            sys.unraisablehook = hook
            _received = None


def received() -> int | None:
    """The signal that interrupted the run (signal.SIGINT, signal.SIGTERM), if one did."""
    return _received


def check() -> None:
    """Raises KeyboardInterrupt if a signal was noted (one that TVM may have turned into an error)."""
    if _received is not None:
        raise KeyboardInterrupt
