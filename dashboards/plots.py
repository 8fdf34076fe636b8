"""A job's figures, as interactive HTML (plotly, one self-contained page) and PNG (matplotlib).

- front: memory (MiB) vs measured KL for the mixed points, the uniform baselines and the proxy's predictions;
- bit map: one config's chosen bits on a grid of block index x layer kind (e.g. 12 x `self_attn.q_proj`),
  layers outside numbered blocks in a row of their own;
- sensitivity: the table, layer x format, on a log colour scale.

`write_plots(results)` reads front.json, the configs and sensitivity.json of a result folder and
writes `plots/` into it: dashboard.html, front.png, sensitivity.png and bitmaps/<config>.png per point.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bitalloc import configio
from bitalloc.metrics import metric_of
from bitalloc.sensitivity.cache import SCHEMA as TABLE_SCHEMA

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


def bit_grid(layers: dict[str, dict]) -> tuple[list[str], list[str], np.ndarray]:
    """A config's bits on the layer grid; NaN where a block has no such layer."""
    rows, cols, cells = layer_grid(list(layers))
    grid = np.full((len(rows), len(cols)), np.nan)
    for name, fmt in layers.items():
        grid[cells[name]] = fmt["bits"]
    return rows, cols, grid


def _series(front: dict) -> dict:
    mixed = sorted(front["points"], key=lambda p: p["bytes"])
    uniform = sorted(front["uniform"], key=lambda p: p["bytes"])
    proxy = front.get("proxy_front", {})
    return {
        "mixed": mixed,
        "uniform": uniform,
        "proxy_mib": [b / 2**20 for b in proxy.get("bytes", [])],
        "proxy_predicted": proxy.get("predicted", []),
    }


def _kl(v: float) -> float:
    """KL on a log axis: an exact 0 (FP16 kept) sits at the axis floor instead of vanishing."""
    return max(float(v), _MIN_KL)


def front_png(front: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, m = _series(front), metric_of(front)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if s["proxy_mib"]:
        ax.plot(s["proxy_mib"], [_kl(v) for v in s["proxy_predicted"]], color="0.7", lw=1,
                label=f"proxy front ({front['sensitivity']['estimator']}, predicted)")
    ax.plot([p["mib"] for p in s["mixed"]], [_kl(p[m.loss]) for p in s["mixed"]], "o-", color="C0",
            label=f"mixed (measured {m.loss_label})")
    ax.plot([p["mib"] for p in s["mixed"]], [_kl(p["predicted"]) for p in s["mixed"]], "x", color="C0", alpha=0.6,
            label="mixed (predicted)")
    ax.plot([u["mib"] for u in s["uniform"]], [_kl(u[m.loss]) for u in s["uniform"]], "s--", color="C3",
            label=f"uniform (measured {m.loss_label})")
    for u in s["uniform"]:
        ax.annotate(u["format"], (u["mib"], _kl(u[m.loss])), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("model size (MiB, weights + scales + zero points + unquantized tensors)")
    ax.set_ylabel(m.loss_axis)
    ax.set_title(f"{front['model']['source']}: Pareto front")
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


def _format_names(table: dict) -> list[str]:
    from bitalloc.formats import Format

    return [Format.from_dict(f).name for f in table["formats"]]


def write_plots(results: Path) -> list[Path]:
    """Every figure of the result folder RESULTS into RESULTS/plots; returns the files written."""
    front = configio.read(results / "front.json", configio.FRONT_SCHEMA)
    table = configio.read(results / "sensitivity.json", TABLE_SCHEMA)
    out = results / "plots"
    (out / "bitmaps").mkdir(parents=True, exist_ok=True)
    written = [out / "front.png", out / "sensitivity.png"]
    front_png(front, written[0])
    values = np.asarray(table["values"], dtype=float)
    formats = _format_names(table)
    _heat_png(values, table["layers"], formats, f"sensitivity ({table['estimator']}): predicted loss increase",
              "predicted loss increase", written[1], log=True)
    configs = {}
    for row in front["points"] + front["uniform"]:
        doc = configio.read(results / row["config"], configio.CONFIG_SCHEMA)
        label = row.get("label") or f"uniform {row['format']}"
        configs[label] = (row, doc["layers"])
        rows, cols, grid = bit_grid(doc["layers"])
        path = out / "bitmaps" / (Path(row["config"]).stem + ".png")
        m = metric_of(front)
        _heat_png(grid, rows, cols, f"{label}: {row['avg_bits']:.3f} avg bits, {m.loss_label} {row[m.loss]:.4g}",
                  "bits", path)
        written.append(path)
    html = out / "dashboard.html"
    html.write_text(dashboard_html(front, table, formats, configs))
    written.append(html)
    return written


def dashboard_html(front: dict, table: dict, formats: list[str], configs: dict[str, tuple[dict, dict]]) -> str:
    """One self-contained page: the front, the bit map of any point (menu), the sensitivity heatmap."""
    import plotly.graph_objects as go

    s, m = _series(front), metric_of(front)
    fig = go.Figure()
    if s["proxy_mib"]:
        fig.add_scatter(x=s["proxy_mib"], y=[_kl(v) for v in s["proxy_predicted"]], mode="lines",
                        line=dict(color="lightgray"), name="proxy front (predicted)")
    fig.add_scatter(x=[p["mib"] for p in s["mixed"]], y=[_kl(p[m.loss]) for p in s["mixed"]], mode="lines+markers",
                    name=f"mixed (measured {m.loss_label})", text=[p["label"] for p in s["mixed"]],
                    customdata=[[p["avg_bits"], p[m.quality], p["predicted"]] for p in s["mixed"]],
                    hovertemplate=f"%{{text}}<br>%{{x:.2f}} MiB, %{{customdata[0]:.3f}} avg bits<br>{m.loss_label} "
                                  f"%{{y:.4g}}, {m.quality_label} %{{customdata[1]:.4g}}<br>predicted "
                                  f"%{{customdata[2]:.4g}}<extra></extra>")
    fig.add_scatter(x=[u["mib"] for u in s["uniform"]], y=[_kl(u[m.loss]) for u in s["uniform"]],
                    mode="lines+markers+text", line=dict(dash="dash"), name=f"uniform (measured {m.loss_label})",
                    text=[u["format"] for u in s["uniform"]], textposition="top right")
    fig.update_layout(title=f"{front['model']['source']}: Pareto front", xaxis_title="model size (MiB)",
                      yaxis_title=m.loss_axis, yaxis_type="log", height=520)

    bitmap = go.Figure()
    labels = list(configs)
    for i, label in enumerate(labels):
        rows, cols, grid = bit_grid(configs[label][1])
        bitmap.add_heatmap(z=grid, x=cols, y=rows, zmin=2, zmax=16, colorscale="Viridis", visible=i == 0,
                           colorbar=dict(title="bits"), name=label,
                           hovertemplate="block %{y}, %{x}: %{z} bits<extra></extra>")
    bitmap.update_layout(
        title="per-layer bits (choose a point)", height=max(400, 14 * len(rows) + 160),
        yaxis=dict(autorange="reversed", type="category"), xaxis=dict(type="category"),
        updatemenus=[dict(buttons=[dict(label=f"{l} ({configs[l][0]['avg_bits']:.3f} b)", method="update",
                                         args=[{"visible": [j == i for j in range(len(labels))]}])
                                   for i, l in enumerate(labels)], x=1.0, y=1.12, xanchor="right")],
    )
    values = np.asarray(table["values"], dtype=float)
    heat = go.Figure(go.Heatmap(z=np.log10(np.clip(values, 1e-12, None)), x=formats, y=table["layers"],
                                colorscale="Viridis", colorbar=dict(title="log10"), customdata=values,
                                hovertemplate="%{y} @ %{x}: %{customdata:.4g}<extra></extra>"))
    heat.update_layout(title=f"sensitivity ({table['estimator']}): predicted loss increase",
                       height=max(400, 9 * len(table["layers"]) + 160), yaxis=dict(autorange="reversed"))
    parts = [fig.to_html(full_html=False, include_plotlyjs=True),
             bitmap.to_html(full_html=False, include_plotlyjs=False),
             heat.to_html(full_html=False, include_plotlyjs=False)]
    title = f"bitalloc: {front['job']['name']}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h2>{title}</h2>" + "".join(parts) + "</body></html>")
