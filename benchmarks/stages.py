"""Time each stage of a search on the default model and print a table.

    .venv/bin/python benchmarks/stages.py [--evaluation 4] [--seq-len 512]

Stages: load, tokenize, quantize cache, estimator, whole-front solve, FP reference, and one
evaluation with the quantized-weight cache against one that quantizes on the fly.
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

from bitalloc.data import make_token_sets, text_files, tokenize_files  # noqa: E402
from bitalloc.evaluate import Evaluator, OnTheFly, QuantCache  # noqa: E402
from bitalloc.formats import Format  # noqa: E402
from bitalloc.jobs.runner import build_problem  # noqa: E402
from bitalloc.model import list_layers, load_model, select_layers  # noqa: E402
from bitalloc.search import get_solver  # noqa: E402
from bitalloc.sensitivity import EstimatorContext, get_estimator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evaluation", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
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
    model = timed("load model (GGUF -> float32)", lambda: load_model("smollm2-135m"))
    layers = select_layers(list_layers(model))
    tokens = timed("tokenize Shakespeare", lambda: tokenize_files(text_files("shakespeare"), model.tokenizer),
                   lambda t: f"{len(t):,} tokens")
    data = make_token_sets(tokens, args.seq_len, 4, args.evaluation, seed=0)
    cache = timed("quantize cache (210 layers x 6 formats)", lambda: QuantCache(model, layers, formats),
                  lambda c: f"{c.nbytes / 2**20:.0f} MiB held")
    ctx = EstimatorContext(model, layers, formats, cache, data.calibration, data.data_hash, 0)
    timed("estimator sqnr (data-free)", lambda: get_estimator("sqnr").estimate(ctx))
    table = timed("estimator fisher, output side (default; 4 x 512 tokens)",
                  lambda: get_estimator("fisher", side="output").estimate(ctx))
    problem = build_problem(model, layers, formats, table)
    solver = get_solver("dp")
    front = timed("solve whole front (dp)", lambda: solver.front(problem),
                  lambda f: f"{len(f)} front points, slack {solver.slack_bytes} B")
    evaluator = timed(f"FP reference ({args.evaluation} x {args.seq_len} tokens)",
                      lambda: Evaluator(model, cache, data.evaluation, 2),
                      lambda e: f"{e.reference_nbytes / 2**20:.0f} MiB held")
    config = front[len(front) // 2].assignment()
    timed("one evaluation, cached weights", lambda: evaluator.evaluate(config), lambda m: f"KL {m.loss:.4f}", 3)
    fly = Evaluator.__new__(Evaluator)
    fly.__dict__.update(evaluator.__dict__, weights=OnTheFly(model, layers))
    timed("one evaluation, quantized on the fly", lambda: fly.evaluate(config), lambda m: f"KL {m.loss:.4f}", 3)

    out = Table(title=f"bitalloc stages on smollm2-135m ({torch.get_num_threads()} threads)")
    out.add_column("stage")
    out.add_column("seconds", justify="right")
    out.add_column("note")
    for name, secs, note in rows:
        out.add_row(name, f"{secs:.2f}", note)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.caption = f"peak RSS {peak:.2f} GiB; front spans {np.ptp([c.bytes for c in front]) / 2**20:.1f} MiB"
    Console().print(out)


if __name__ == "__main__":
    main()
