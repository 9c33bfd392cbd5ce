"""Running the walk's event loop so that Ctrl-C / SIGTERM unwind it cleanly.

A signal handler that raises KeyboardInterrupt (``ops.signals``) would raise it wherever the
loop happens to be: inside one fetch task (whose traceback asyncio then prints as "Task
exception was never retrieved"), or inside a callback that swallows it. While the loop runs,
the signals are delivered through the loop instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_interruptibly(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, except that an interruption lets every task unwind before it goes on:
    SIGTERM / SIGINT run their handler on the loop, and if it interrupts, the main task is
    cancelled (it cancels and awaits its workers and closes the client) and the
    KeyboardInterrupt is raised once everything has ended."""
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(main)
        interrupted: list[BaseException] = []
        restore = _signals_through(loop, task, interrupted)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupted:
                raise interrupted[0] from None
            raise
        except KeyboardInterrupt:  # raised by other means (off the main thread, say)
            task.cancel()
            while not task.done():
                # A task the interruption hit re-raises it when it ends: keep unwinding.
                with contextlib.suppress(KeyboardInterrupt):
                    loop.run_until_complete(task)
            if not task.cancelled():
                task.exception()  # retrieved: it is the interruption being raised here
            raise
        finally:
            restore()


def _signals_through(loop: asyncio.AbstractEventLoop, task: asyncio.Task,
                     interrupted: list[BaseException]) -> Callable[[], None]:
    """Run the installed SIGTERM / SIGINT handlers from ``loop``; one that raises
    KeyboardInterrupt cancels ``task``. Returns what puts the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed: dict[int, Callable] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if not callable(handler):
            continue  # default or ignored: the signal keeps doing what it did

        def on_signal(sig: int = sig, handler: Callable = handler) -> None:
            try:
                handler(sig, None)
            except KeyboardInterrupt as e:
                interrupted.append(e)
                task.cancel()

        loop.add_signal_handler(sig, on_signal)
        installed[sig] = handler

    def restore() -> None:
        for sig, handler in installed.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    return restore
