"""How a writing command ends when it is told to stop: SIGTERM and SIGHUP become ``SystemExit(128 + signal)``
and SIGINT stays ``KeyboardInterrupt``, so the exception unwinds through the atomic writers, which remove their
temporary files and folders (SIGKILL leaves them to the next run: qpeft_deploy.atomic.remove_stale)."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])
UNWINDING = (signal.SIGTERM, signal.SIGHUP)


def _exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Meanwhile, SIGTERM and SIGHUP raise SystemExit in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _exit) for signum in UNWINDING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def unwinds(command: F) -> F:
    """Decorate a writing command's function: it runs inside :func:`signals_unwind`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with signals_unwind():
            return command(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
