"""Time each stage of a search on the default model and print a table.

    .venv/bin/python benchmarks/stages.py [--evaluation 4] [--seq-len 512]

Stages (the pipeline's own functions): load, tokenize, quantize cache, estimators, whole-front solve, FP
reference, and candidate evaluation with streamed levels (a working set of one candidate, the default) against
every level held dequantized in memory (the design before the level store).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bitalloc import pipeline  # noqa: E402
from bitalloc.evaluate import Evaluator  # noqa: E402
from bitalloc.formats import Format  # noqa: E402
from bitalloc.quantizers.store import Levels  # noqa: E402
from bitalloc.progress import Stages  # noqa: E402
from bitalloc.search import get_solver  # noqa: E402
from bitalloc.sensitivity import get_estimator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evaluation", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--candidates", type=int, default=8)
    args = ap.parse_args()
    rows: list[tuple[str, float, str]] = []

    def timed(name, fn, note="", repeat=1):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - start)
        text = note(value) if callable(note) else note
        rows.append((name, float(np.median(times)), text + (f" (median of {repeat})" if repeat > 1 else "")))
        return value

    formats = tuple(Format(b, 64) for b in (2, 3, 4, 5, 6, 8))
    stages = Stages()
    ws = pipeline.Workspace.open("smollm2-135m", formats, seq_len=args.seq_len, calibration=4,
                                 evaluation=args.evaluation, stages=stages)
    rows += [("load model (GGUF -> float32)", stages.timings["load model"], ""),
             ("tokenize Shakespeare", stages.timings["tokenize text"], ""),
             (f"level store ({len(ws.layers)} layers x 6 formats)", stages.timings[next(k for k in stages.timings
                                                                                     if k.startswith("quantize"))],
              f"{ws.levels.nbytes / 2**20:.0f} MiB on disk (made now, or reused)")]
    with_cache = os.environ.get("BITALLOC_CACHE")
    os.environ["BITALLOC_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bitalloc-stages-{os.getpid()}")
    timed("estimator sqnr (data-free)", lambda: pipeline.sensitivity(ws, get_estimator("sqnr"), 0))
    table = timed("estimator fisher, output side (default; 4 x 512 tokens)",
                  lambda: pipeline.sensitivity(ws, get_estimator("fisher", side="output"), 0)).table
    if with_cache is not None:
        os.environ["BITALLOC_CACHE"] = with_cache
    problem = pipeline.build_problem(ws.model, ws.layers, formats, table)
    front = timed("solve whole front (dp)", lambda: get_solver("dp").front(problem),
                  lambda f: f"{len(f.configs)} front points, slack {f.slack_bytes} B")
    evaluator = timed(f"FP reference ({args.evaluation} x {args.seq_len} tokens)",
                      lambda: Evaluator(ws.model, ws.levels, ws.data.evaluation, 2),
                      lambda e: f"{e.reference_nbytes / 2**20:.0f} MiB held")
    configs = [c.assignment() for c in pipeline.spread(front.configs, args.candidates)]
    every = Levels(ws.model, ws.layers, formats, ws.levels.stores, working_set=None)
    for layer in ws.layers:  # held before timing, as the former all-in-memory cache was
        for fmt in formats:
            every.weight(layer.name, fmt)
    # interleaved, candidate by candidate, so both policies see the same machine load
    times: dict[str, list[float]] = {"streamed": [], "in memory": []}
    losses: dict[str, list[float]] = {"streamed": [], "in memory": []}
    for round_ in range(2):
        for config in configs:
            policies = [("streamed", ws.levels), ("in memory", every)]
            for name, levels in policies if round_ == 0 else policies[::-1]:
                evaluator.levels = levels
                start = time.perf_counter()
                losses[name].append(evaluator.evaluate(config).loss)
                times[name].append(time.perf_counter() - start)
    assert losses["streamed"] == losses["in memory"], "streamed and in-memory evaluations differ"
    per = {name: float(np.median(t)) for name, t in times.items()}
    rows += [(f"per candidate ({len(configs)} on the front x 2), streamed levels (default)", per["streamed"],
              f"dequantized weights held: {ws.levels.held_bytes / 2**20:.0f} MiB (median)"),
             (f"per candidate ({len(configs)} on the front x 2), every level in memory (former cache)",
              per["in memory"], f"dequantized weights held: {every.held_bytes / 2**20:.0f} MiB (median)"),
             ("streamed vs in memory", per["streamed"] / per["in memory"] - 1, "relative time per candidate")]

    out = Table(title=f"bitalloc stages on smollm2-135m ({torch.get_num_threads()} threads)")
    out.add_column("stage")
    out.add_column("seconds", justify="right")
    out.add_column("note")
    for name, secs, note in rows:
        out.add_row(name, f"{secs:.2f}", note)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.caption = f"peak RSS {peak:.2f} GiB; front spans {np.ptp([c.bytes for c in front.configs]) / 2**20:.1f} MiB"
    Console().print(out)


if __name__ == "__main__":
    main()
