"""The evolutionary front against the exact proxy front on the default model, at 3.0, 3.5 and 4.0
average bits: held-out KL of each, and the evaluations the evolutionary search spent.

    .venv/bin/python benchmarks/evolutionary.py [--evaluations 160] [--estimator sqnr]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitalloc.jobs.runner import run_job
from bitalloc.jobs.spec import load_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "smollm2.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evaluations", type=int, default=160)
    ap.add_argument("--estimator", default=None)
    args = ap.parse_args()
    common = ["search.budgets=[3.0,3.5,4.0]", "search.points=0", "formats.bits=[2,3,4,5,6,8]"]
    if args.estimator:
        common.append(f"sensitivity.estimator={args.estimator}")
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        proxy = run_job(load_spec(EXAMPLE, common + ["search.solver=dp"]), Path(tmp) / "dp", console)
        evo = run_job(load_spec(EXAMPLE, common + ["search.solver=auto", f"search.evaluations={args.evaluations}"]),
                      Path(tmp) / "evo", console)
    rows = {p.label: p for p in proxy.mixed}
    table = Table(title=f"held-out KL at equal bytes: exact proxy front ({proxy.sensitivity.estimator}) "
                        f"vs evolutionary refinement")
    for col in ("budget", "proxy KL", "evolutionary KL", "change", "uniform at the same bytes"):
        table.add_column(col, justify="right")
    uniform = {round(u.avg_bits, 3): u.loss for u in proxy.uniform}
    for point in evo.mixed:
        base = rows[point.label]
        table.add_row(point.label, f"{base.loss:.4f}", f"{point.loss:.4f}", f"{point.loss / base.loss - 1:+.1%}",
                      f"{uniform[round(point.avg_bits, 3)]:.4f}" if round(point.avg_bits, 3) in uniform else "-")
    counts = evo.solver.evaluations
    table.caption = (f"evolutionary search: {counts.screen} screening evaluations ({evo.job.name}, "
                     f"{evo.data.calibration_tokens} calibration tokens, screen = 512 tokens), "
                     f"{counts.full} full-fidelity evaluations; search took {evo.solver.wall_time_s:.0f} s")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
