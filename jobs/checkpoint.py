"""A job's results checkpointed as they arrive, so a job whose driver died re-runs only what had not finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from bitalloc.tasks import Backend, EvalTask, OnResult
from bitalloc.types import Measurement


class Checkpointed:
    """Saves each result as it arrives (one JSON line per task) and reuses saved ones, so a job whose
    driver died re-runs only what had not finished. `computed` and `reused` count both kinds."""

    def __init__(self, backend: Backend, path: Path):
        self.backend = backend
        self.path = path
        self.known: dict[str, Measurement] = {}
        self.computed = 0
        self.reused = 0
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.known[row["key"]] = Measurement(row["loss"], row["quality"], row["tokens"],
                                                         row.get("loss_error", 0.0))
                except (ValueError, KeyError):
                    continue

    def map(self, tasks: list[EvalTask], progress: Callable[[int], None] | None = None,
            on_result: OnResult | None = None) -> list[Measurement]:
        keys = [t.key() for t in tasks]
        todo = [i for i, k in enumerate(keys) if k not in self.known]
        self.reused += len(tasks) - len(todo)
        if progress and len(tasks) > len(todo):
            progress(len(tasks) - len(todo))
        with open(self.path, "a") as fh:
            def save(j: int, m: Measurement) -> None:
                self.known[keys[todo[j]]] = m
                fh.write(json.dumps({"key": keys[todo[j]], "loss": m.loss, "quality": m.quality, "tokens": m.tokens,
                                     "loss_error": m.loss_error}) + "\n")
                fh.flush()
                if on_result:
                    on_result(todo[j], m)

            self.backend.map([tasks[i] for i in todo], progress, save)
        self.computed += len(todo)
        return [self.known[k] for k in keys]
