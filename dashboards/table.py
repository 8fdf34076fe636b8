"""Terminal tables: the front (mixed configs, uniform baselines and the FP model, by size), a model's layers,
a sensitivity table's most sensitive layers, estimator scores, a cluster's jobs."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from bitalloc.results import Front


def front_table(front: Front) -> Table:
    ref, m = front.reference, front.metric.metric()
    table = Table(title=f"{front.model.source}: Pareto front (FP {m.quality_name} "
                        f"{ref.quality:{m.quality_format}}, {ref.tokens} held-out tokens; MiB: {front.size_axis})")
    for col in ("config", "avg bits", "MiB", "predicted", m.loss_label, m.quality_label):
        table.add_column(col, justify="left" if col == "config" else "right")
    for p in sorted(front.points, key=lambda p: (p.bytes, p.label)):
        table.add_row(p.label, f"{p.avg_bits:.3f}", f"{p.mib:.2f}", f"{p.predicted:.4g}", f"{p.loss:.4f}",
                      f"{p.quality:{m.quality_format}}", style="dim" if p.kind == "uniform" else None)
    table.add_row("FP (unquantized)", "-", f"{ref.mib:.2f}", "0", "0", f"{ref.quality:{m.quality_format}}",
                  style="bold")
    return table


def layers_table(source: str, layers, formats, uncovered=(), covered: tuple[int, int] | None = None) -> Table:
    """The quantizable layers (an expert unit as experts x out x in) with their bytes at each format, then the
    weights of 2 or more dimensions no layer holds, each with why."""
    share = f", {100 * covered[0] / covered[1]:.1f} % of the non-embedding parameters" if covered and covered[1] else ""
    units = sum(not l.tied_to for l in layers)  # a tied head is its embedding's tensor, counted there
    table = Table(title=f"{source}: {units} quantizable layers{share}")
    for col in ["layer", "shape", "dtype", "tied to"] + [f.name for f in formats]:
        table.add_column(col, justify="left" if col in ("layer", "tied to") else "right")
    for layer in layers:
        tied = (f"token embedding{f', tied head {layer.head}' if layer.head else ''}" if layer.embedding
                else f"{layer.tied_to} (searched as it)" if layer.tied_to else "")
        table.add_row(layer.name, " x ".join(map(str, layer.shape)), layer.dtype, tied,
                      *["" if layer.tied_to else f"{layer.bytes_at(f):,}" for f in formats])
    for u in uncovered:
        table.add_row(u.name, f"{u.numel:,} params", "", f"not quantizable: {u.why}", *["" for _ in formats],
                      style="dim")
    return table


def sensitivity_summary(result, top: int = 10) -> Table:
    """The `top` most sensitive layers at the middle format (a `pipeline.TableResult`)."""
    t = result.table
    mid = len(t.formats) // 2
    how = "cache hit" if result.cache_hit else f"{t.wall_time_s:.1f} s"
    table = Table(title=f"{t.estimator} {t.params if t.params else ''}: most sensitive layers at "
                        f"{t.formats[mid].name} ({how})")
    table.add_column("layer")
    for fmt in t.formats:
        table.add_column(fmt.name, justify="right")
    for i in np.argsort(-t.values[:, mid])[:top]:
        table.add_row(t.layers[i], *[f"{v:.3g}" for v in t.values[i]])
    return table


def score_table(scores, source: str) -> Table:
    """Estimators ranked by Spearman ρ (a `jobs.scoring.Scores`)."""
    lo, hi = scores.range_bits
    table = Table(title=f"estimators on {source}: {len(scores.configs)} random configs, {lo}-{hi} avg bits, "
                        f"held-out KL")
    for col in ("estimator", "Spearman ρ", "R²", "R² (scaled)", "seconds", "peak RSS GiB", "cached"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    for r in sorted(scores.rows, key=lambda r: -r.spearman):
        peak = f"{r.peak_rss_bytes / 2**30:.2f}" if r.peak_rss_bytes else "-"
        table.add_row(r.estimator, f"{r.spearman:.3f}", f"{r.r2:.3f}", f"{r.r2_scaled:.3f}", f"{r.wall_time_s:.1f}",
                      peak, "yes" if r.cache_hit else "")
    return table


def jobs_table(infos) -> Table:
    """Ray Jobs' job infos, with the bitalloc job name and spec hash from their metadata."""
    table = Table(title="jobs")
    for col in ("id", "status", "bitalloc job", "spec hash"):
        table.add_column(col)
    for info in infos:
        meta = info.metadata or {}
        table.add_row(info.submission_id or info.job_id or "", str(info.status.value), meta.get("bitalloc_job", ""),
                      meta.get("spec_hash", "")[:19])
    return table
