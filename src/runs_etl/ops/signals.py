"""SIGTERM / SIGINT as an interruption: the running work unwinds (rolls back, releases its lock,
records the failure) and the process exits 130.

DuckDB turns a KeyboardInterrupt raised while a query runs into its own "Query interrupted"
error, so whether a signal arrived is also remembered here: callers treat any failure after one
as the interruption it is.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_received = threading.Event()


def interrupt(signum: int | None = None, frame=None) -> None:
    """Signal handler (and what a scheduler calls to abort): remember, then unwind."""
    _received.set()
    raise KeyboardInterrupt


def was_interrupted() -> bool:
    return _received.is_set()


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (systemd stop, ``kill``, ``timeout``) and SIGINT unwind like
    Ctrl-C. Only the main thread may install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
