"""A clean stop on the first Ctrl-C (SIGINT) or SIGTERM: the run ends between or inside patients
without marking anyone failed, and the caller says how to resume.

Libraries on the way can turn the interrupt into their own error: SimpleITK aborts its filter and
raises ``RuntimeError`` ("Exception thrown in SimpleITK …") when a signal arrives during a
registration. So the handler records the signal before raising, and `stop_requested` lets a
``except Exception`` tell a user's stop from a patient's failure.

Examples:
    >>> from medfusion.run.interrupt import stop_requested
    >>> stop_requested()
    0
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

_state = {"signum": 0, "depth": 0}


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt, which it stands beside)
    """The user asked the run to stop (`signum`: SIGINT or SIGTERM). Not an error of any patient."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """SIGINT, SIGTERM, … (the name of signal number `signum`)."""
    return signal.Signals(signum).name


def stop_requested() -> int:
    """The signal number of a pending stop request (0 when none)."""
    return _state["signum"]


def check_stop(exc: BaseException | None = None) -> None:
    """Raise `Interrupted` when a stop was requested, or when `exc` is an interrupt in disguise
    (a KeyboardInterrupt, or SimpleITK's abort of a filter the signal reached)."""
    signum = _state["signum"]
    if not signum and exc is not None:
        text = str(exc)
        if isinstance(exc, KeyboardInterrupt) or "ProcessAborted" in text or "KeyboardInterrupt" in text:
            signum = int(signal.SIGINT)
    if signum:
        raise Interrupted(signum) from exc


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` (once: a second signal gets the
    previous handler, so a stuck stop can still be forced). Outside the main thread: no change.

    Nested blocks share the outermost one's handlers: `medfusion run` enters one before its imports
    (a stop during the first seconds is a clean stop too) and the cohort runner another inside it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"]:
        # the outer block's hook may have been replaced since (typer installs its own excepthook when
        # the app starts): wrap whatever hook is current for this block
        with _quiet_stops():
            yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        _state["signum"] = signum
        for old_sig, old_handler in previous.items():
            signal.signal(old_sig, old_handler)
        raise Interrupted(signum)

    for signum in (int(signal.SIGINT), int(signal.SIGTERM)):
        previous[signum] = signal.signal(signum, handler)
    _state["depth"] = 1
    try:
        with _quiet_stops():
            yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _state["signum"] = 0
        _state["depth"] = 0


@contextlib.contextmanager
def _quiet_stops() -> Iterator[None]:
    """Within the block, `sys.excepthook` prints nothing for `Interrupted`: a C++ library calling back
    into Python (SimpleITK's iteration commands) prints an exception raised in the callback through
    sys.excepthook before it aborts, and a user's stop needs no traceback."""
    old_hook = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not issubclass(kind, Interrupted):
            old_hook(kind, value, tb)

    sys.excepthook = hook
    try:
        yield
    finally:
        sys.excepthook = old_hook
