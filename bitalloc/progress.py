"""Progress of long stages on the terminal (rich, on stderr), and the wall time of each stage."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Stages:
    """Rich progress for every long stage, and the wall time of each (`timings`, seconds by stage name).
    Without a console it only times: library callers and tests see nothing."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True, quiet=True)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console,
        )
        self.timings: dict[str, float] = {}

    def __enter__(self) -> "Stages":
        self.progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        quiet = self.console.quiet
        if exc_type is not None:
            self.console.quiet = True
        self.progress.stop()
        self.console.quiet = quiet

    def print(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    @contextmanager
    def stage(self, name: str, total: int | None = None):
        task = self.progress.add_task(name, total=total)
        start = time.perf_counter()
        yield lambda n=1: self.progress.advance(task, n)
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.progress.update(task, completed=total if total is not None else 1, total=total or 1)
