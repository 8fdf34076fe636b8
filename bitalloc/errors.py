"""The errors users see: a `BitallocError` names the field at fault and what is allowed there; an
`Interrupted` is Ctrl-C or SIGTERM, carried past every `except Exception` so cleanup still runs."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class BitallocError(Exception):
    """A user-facing error; the CLI prints `error: FIELD: MESSAGE` on one line and exits 2."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """A library's error as one short line: its first line, whitespace collapsed (its type if it says nothing);
    a longer one ends at its first sentence that fits, or at a word, marked with "…"."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = " ".join(text.splitlines()[0].split())
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]
    end = max(cut.rfind(". "), cut.rfind("; "))
    return cut[:end + 1] if end > limit // 3 else cut.rsplit(" ", 1)[0] + " …"


class Interrupted(BaseException):
    """The user stopped the command (SIGINT or SIGTERM); `hint` says what to do next. The CLI exits 130."""

    def __init__(self, signum: int, hint: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.hint = hint


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM recorded instead of raised while the block runs, for a library call an exception must not
    cross (Ray's wait, in its own C++ code, turns one into a SystemError): the block polls the list it is given and
    raises `Interrupted` itself. Outside the main thread, signals are not this thread's: a no-op."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_on_signals() -> None:
    """Turn SIGINT and SIGTERM into `Interrupted` in this (main) thread, so a stop unwinds through every
    `finally` (Ray shut down, the MLflow UI stopped, staging kept for --resume) instead of killing the process."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
