"""A job's figures, as interactive HTML (plotly, one self-contained page) and PNG (matplotlib).

- front: memory (MiB) vs measured KL for the mixed points, the uniform baselines and the proxy's predictions;
- bit map: one config's chosen bits on a grid of block index x layer kind (e.g. 12 x `self_attn.q_proj`),
  layers outside numbered blocks in a row of their own;
- sensitivity: the table, layer x format, on a log colour scale.

`write_plots(folder, results)` draws a job's typed results (front, configs, sensitivity table) into
FOLDER/plots: dashboard.html, front.png, sensitivity.png and bitmaps/<config>.png per point.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bitalloc.results import ConfigDoc, Front, Point
from bitalloc.types import SensitivityTable

_BLOCK = re.compile(r"^(?P<stem>.*?)\.(?P<index>\d+)\.(?P<kind>.+)$")
_MIN_KL = 1e-6


def layer_grid(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows (block indices, then 'other'), columns (layer kinds) and each layer's cell."""
    blocks, kinds, cells = [], [], {}
    parsed = {n: _BLOCK.match(n) for n in names}
    for name, m in parsed.items():
        row = f"{m['index']}" if m else "other"
        kind = m["kind"] if m else name
        if row != "other" and row not in blocks:
            blocks.append(row)
        if kind not in kinds:
            kinds.append(kind)
        cells[name] = (row, kind)
    rows = sorted(blocks, key=int) + (["other"] if any(r == "other" for r, _ in cells.values()) else [])
    return rows, kinds, {n: (rows.index(r), kinds.index(k)) for n, (r, k) in cells.items()}


def bit_grid(config: ConfigDoc) -> tuple[list[str], list[str], np.ndarray]:
    """A config's bits on the layer grid; NaN where a block has no such layer."""
    rows, cols, cells = layer_grid(list(config.layers))
    grid = np.full((len(rows), len(cols)), np.nan)
    for name, fmt in config.layers.items():
        grid[cells[name]] = fmt.bits
    return rows, cols, grid


def _kl(v: float) -> float:
    """KL on a log axis: an exact 0 (FP16 kept) sits at the axis floor instead of vanishing."""
    return max(float(v), _MIN_KL)


def _proxy_mib(front: Front) -> list[float]:
    return [b / 2**20 for b in front.proxy_front.bytes]


def _runtime_groups(front: Front) -> list[tuple[str, str, list]]:
    """`bitalloc verify`'s points by (runtime, kind): what each runtime built from an export, and its presets."""
    groups: dict[tuple[str, str], list] = {}
    for r in sorted(front.runtime_points, key=lambda r: r.bytes):
        groups.setdefault((r.runtime, r.kind), []).append(r)
    return [(runtime, kind, shown) for (runtime, kind), shown in groups.items()]


def front_png(front: Front, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed, uniform, m = front.mixed, front.uniform, front.metric.metric()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if front.proxy_front.bytes:
        ax.plot(_proxy_mib(front), [_kl(v) for v in front.proxy_front.predicted], color="0.7", lw=1,
                label=f"proxy front ({front.sensitivity.estimator}, predicted)")
    ax.plot([p.mib for p in mixed], [_kl(p.loss) for p in mixed], "o-", color="C0",
            label=f"mixed (measured {m.loss_label})")
    ax.plot([p.mib for p in mixed], [_kl(p.predicted) for p in mixed], "x", color="C0", alpha=0.6,
            label="mixed (predicted)")
    ax.plot([u.mib for u in uniform], [_kl(u.loss) for u in uniform], "s--", color="C3",
            label=f"uniform (measured {m.loss_label})")
    for u in uniform:
        ax.annotate(u.format, (u.mib, _kl(u.loss)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    runtimes = sorted({r.runtime for r in front.runtime_points})
    for runtime, kind, shown in _runtime_groups(front):
        marker, color = ("D" if kind == "point" else "^"), ("C2", "C4", "C5", "C6")[runtimes.index(runtime) % 4]
        ax.plot([r.mib for r in shown], [_kl(r.loss) for r in shown], marker, color=color, mfc="none" if
                kind == "preset" else color, ls="none", label=f"{runtime} {'presets' if kind == 'preset' else 'built'} "
                                                              f"(its own {m.loss_label})")
        if kind == "preset":
            for r in shown:
                ax.annotate(r.label.split()[-1], (r.mib, _kl(r.loss)), textcoords="offset points", xytext=(4, -8),
                            fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel(f"model size (MiB, {front.size_axis})")
    ax.set_ylabel(m.loss_axis)
    ax.set_title(f"{front.model.source}: Pareto front")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _heat_png(z: np.ndarray, rows: list[str], cols: list[str], title: str, label: str, path: Path,
              log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    height = max(3.0, 0.18 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(cols) + 3), height), dpi=110)
    data = np.ma.masked_invalid(z)
    norm = None
    if log:
        positive = z[np.isfinite(z) & (z > 0)]
        norm = LogNorm(*(positive.min(), positive.max()) if positive.size else (1e-12, 1.0))
    im = ax.imshow(data, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    if not log and z.size <= 400:
        for (i, j), v in np.ndenumerate(z):
            if np.isfinite(v):
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color="white" if v < 6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    step = max(1, len(rows) // 40)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(folder: Path, results) -> list[Path]:
    """Every figure of a job's `pipeline.Results` into FOLDER/plots; returns the files written."""
    front, table = results.front, results.table
    out = folder / "plots"
    (out / "bitmaps").mkdir(parents=True, exist_ok=True)
    written = [out / "front.png", out / "sensitivity.png"]
    front_png(front, written[0])
    formats = [f.name for f in table.formats]
    _heat_png(table.values, list(table.layers), formats,
              f"sensitivity ({table.estimator}): predicted loss increase", "predicted loss increase", written[1],
              log=True)
    m = front.metric.metric()
    for p in front.mixed + front.uniform:
        rows, cols, grid = bit_grid(results.configs[p.config])
        path = out / "bitmaps" / (Path(p.config).stem + ".png")
        _heat_png(grid, rows, cols, f"{p.label}: {p.avg_bits:.3f} avg bits, {m.loss_label} {p.loss:.4g}", "bits", path)
        written.append(path)
    html = out / "dashboard.html"
    html.write_text(dashboard_html(front, table, results.configs))
    written.append(html)
    return written


def dashboard_html(front: Front, table: SensitivityTable, configs: dict[str, ConfigDoc]) -> str:
    """One self-contained page: the front, the bit map of any point (menu), the sensitivity heatmap."""
    import plotly.graph_objects as go

    mixed, uniform, m = front.mixed, front.uniform, front.metric.metric()
    fig = go.Figure()
    if front.proxy_front.bytes:
        fig.add_scatter(x=_proxy_mib(front), y=[_kl(v) for v in front.proxy_front.predicted], mode="lines",
                        line=dict(color="lightgray"), name="proxy front (predicted)")
    fig.add_scatter(x=[p.mib for p in mixed], y=[_kl(p.loss) for p in mixed], mode="lines+markers",
                    name=f"mixed (measured {m.loss_label})", text=[p.label for p in mixed],
                    customdata=[[p.avg_bits, p.quality, p.predicted] for p in mixed],
                    hovertemplate=f"%{{text}}<br>%{{x:.2f}} MiB, %{{customdata[0]:.3f}} avg bits<br>{m.loss_label} "
                                  f"%{{y:.4g}}, {m.quality_label} %{{customdata[1]:.4g}}<br>predicted "
                                  f"%{{customdata[2]:.4g}}<extra></extra>")
    fig.add_scatter(x=[u.mib for u in uniform], y=[_kl(u.loss) for u in uniform],
                    mode="lines+markers+text", line=dict(dash="dash"), name=f"uniform (measured {m.loss_label})",
                    text=[u.format for u in uniform], textposition="top right")
    for runtime, kind, shown in _runtime_groups(front):
        fig.add_scatter(x=[r.mib for r in shown], y=[_kl(r.loss) for r in shown], mode="markers",
                        marker=dict(symbol="diamond" if kind == "point" else "triangle-up-open", size=9),
                        name=f"{runtime} {'presets' if kind == 'preset' else 'built'} (its own {m.loss_label})",
                        text=[r.label for r in shown], hovertemplate=f"%{{text}} ({runtime})<br>%{{x:.2f}} MiB<br>"
                                                                     f"{m.loss_label} %{{y:.4g}}<extra></extra>")
    fig.update_layout(title=f"{front.model.source}: Pareto front", xaxis_title=f"model size (MiB, {front.size_axis})",
                      yaxis_title=m.loss_axis, yaxis_type="log", height=520)

    bitmap = go.Figure()
    shown: list[Point] = front.mixed + front.uniform
    labels = [p.label for p in shown]
    for i, p in enumerate(shown):
        rows, cols, grid = bit_grid(configs[p.config])
        bitmap.add_heatmap(z=grid, x=cols, y=rows, zmin=2, zmax=16, colorscale="Viridis", visible=i == 0,
                           colorbar=dict(title="bits"), name=p.label,
                           hovertemplate="block %{y}, %{x}: %{z} bits<extra></extra>")
    bitmap.update_layout(
        title="per-layer bits (choose a point)", height=max(400, 14 * len(rows) + 160),
        yaxis=dict(autorange="reversed", type="category"), xaxis=dict(type="category"),
        updatemenus=[dict(buttons=[dict(label=f"{p.label} ({p.avg_bits:.3f} b)", method="update",
                                         args=[{"visible": [j == i for j in range(len(labels))]}])
                                   for i, p in enumerate(shown)], x=1.0, y=1.12, xanchor="right")],
    )
    values = table.values
    heat = go.Figure(go.Heatmap(z=np.log10(np.clip(values, 1e-12, None)), x=[f.name for f in table.formats],
                                y=list(table.layers),
                                colorscale="Viridis", colorbar=dict(title="log10"), customdata=values,
                                hovertemplate="%{y} @ %{x}: %{customdata:.4g}<extra></extra>"))
    heat.update_layout(title=f"sensitivity ({table.estimator}): predicted loss increase",
                       height=max(400, 9 * len(table.layers) + 160), yaxis=dict(autorange="reversed"))
    parts = [fig.to_html(full_html=False, include_plotlyjs=True),
             bitmap.to_html(full_html=False, include_plotlyjs=False),
             heat.to_html(full_html=False, include_plotlyjs=False)]
    title = f"bitalloc: {front.job.name}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h2>{title}</h2>" + "".join(parts) + "</body></html>")
