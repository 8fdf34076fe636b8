"""The front as a terminal table: the mixed configs, the uniform baselines and the FP model, by size."""

from __future__ import annotations

from rich.table import Table

from bitalloc.metrics import metric_of


def front_table(front: dict) -> Table:
    ref, m = front["reference"], metric_of(front)
    table = Table(title=f"{front['model']['source']}: Pareto front (FP {m.quality_name} "
                        f"{ref[m.quality]:{m.quality_format}}, {ref['tokens']} held-out tokens)")
    for col in ("config", "avg bits", "MiB", "predicted", m.loss_label, m.quality_label):
        table.add_column(col, justify="left" if col == "config" else "right")
    rows = [(p["label"], p) for p in front["points"]] + [(f"uniform {u['format']}", u) for u in front["uniform"]]
    for label, row in sorted(rows, key=lambda r: (r[1]["bytes"], r[0])):
        style = "dim" if label.startswith("uniform") else None
        table.add_row(
            label,
            f"{row['avg_bits']:.3f}",
            f"{row['mib']:.2f}",
            f"{row['predicted']:.4g}",
            f"{row[m.loss]:.4f}",
            f"{row[m.quality]:{m.quality_format}}",
            style=style,
        )
    table.add_row("FP (unquantized)", "-", f"{ref['mib']:.2f}", "0", "0", f"{ref[m.quality]:{m.quality_format}}",
                  style="bold")
    return table
