"""Candidate evaluation through Ray workers against in-process evaluation on the default model:
per-candidate overhead, and throughput with 1 and 2 workers.

    .venv/bin/python benchmarks/ray_overhead.py [--candidates 12] [--tokens 512]

Each candidate is a distinct random config evaluated on `--tokens` held-out tokens. In-process uses
the machine's threads; a Ray worker uses one thread, so 2 workers on 2 cores is the fair comparison
for throughput, and 1 worker with 1 in-process thread the fair one for overhead.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bitalloc.formats import Format  # noqa: E402
from bitalloc.jobs.cluster import ray_session  # noqa: E402
from bitalloc.jobs.workers import RayRunner  # noqa: E402
from bitalloc.pipeline import Workspace  # noqa: E402
from bitalloc.tasks import EvalTask, LocalRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    formats = tuple(Format(b, 64) for b in (3, 4, 8))
    ws = Workspace.open("smollm2-135m", formats, seq_len=args.tokens, calibration=0, evaluation=1)
    model, layers, levels = ws.model, ws.layers, ws.levels
    sets = {"evaluation": ws.data.evaluation}
    rng = np.random.default_rng(0)
    tasks = [EvalTask.config({l.name: formats[i] for l, i in zip(layers, rng.integers(0, 3, len(layers)))}, "evaluation")
             for _ in range(args.candidates)]
    warm = EvalTask("evaluation")
    rows = []

    def measure(label, backend, threads):
        backend.map([warm])  # FP reference built before timing
        start = time.perf_counter()
        results = backend.map(tasks)
        elapsed = time.perf_counter() - start
        rows.append((label, threads, elapsed / len(tasks), len(tasks) / elapsed))
        return results

    for threads in (1, 2):
        torch.set_num_threads(threads)
        reference = measure(f"in process, {threads} thread(s)", LocalRunner(model, levels, sets), threads)
    for workers in (1, 2):
        with ray_session(None, workers):
            runner = RayRunner(model.module, levels, sets, 2, workers)
            assert measure(f"Ray, {workers} worker(s) x 1 thread", runner, workers) == reference
            runner.close()
    table = Table(title=f"candidate evaluation, {args.candidates} configs x {args.tokens} tokens, smollm2-135m, "
                        f"{os.cpu_count()} cores")
    for col in ("backend", "threads", "s / candidate", "candidates / s"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for label, threads, per, rate in rows:
        table.add_row(label, str(threads), f"{per:.3f}", f"{rate:.3f}")
    one_local, one_ray = rows[0][2], rows[2][2]
    table.caption = (f"per-candidate overhead of Ray (1 worker vs 1 in-process thread): {one_ray / one_local - 1:+.1%}; "
                     f"results identical to in-process: yes")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
