"""Score estimators by how well they predict: random configs across a range of average bits are
measured (held-out ΔKL), and each estimator's prediction (its table summed over the config's
layers) is compared with the measurements by Spearman ρ and R².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.console import Console

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.tasks import EvalTask
from bitalloc.sensitivity import get_estimator
from bitalloc.types import Problem

from .runner import Stages, Workspace, build_problem
from .spec import JobSpec


def parse_estimator(text: str) -> tuple[str, dict]:
    """`fisher` or `fisher:side=output,labels=model` -> (name, params); values are parsed as YAML."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise BitallocError("--estimator", f"{text!r}: write NAME or NAME:key=value,key=value")
        params[key.strip()] = configio.parse_yaml(value, "--estimator")
    return name.strip(), params


def random_choices(problem: Problem, n: int, lo_bits: float, hi_bits: float, seed: int,
                   scatter: float = 0.25) -> list[np.ndarray]:
    """n configs whose average bits are stratified over [lo, hi]: each layer takes one of the two
    formats that bracket the target (in the proportion that meets it on average), or with
    probability `scatter` any format, so the configs mix many widths."""
    rng = np.random.default_rng(seed)
    n_layers, n_formats = problem.cost.shape
    eff = np.array([problem.avg_bits(np.full(n_layers, j)) for j in range(n_formats)])
    order = np.argsort(eff)
    out = []
    for k in range(n):
        target = np.clip(lo_bits + (hi_bits - lo_bits) * (k + rng.random()) / n, eff.min(), eff.max())
        hi_idx = min(int(np.searchsorted(eff[order], target)), n_formats - 1)
        lo_idx = max(hi_idx - 1, 0)
        a, b = eff[order[lo_idx]], eff[order[hi_idx]]
        p_high = 0.0 if b == a else (target - a) / (b - a)
        choice = np.where(rng.random(n_layers) < p_high, order[hi_idx], order[lo_idx])
        wild = rng.random(n_layers) < scatter
        choice[wild] = rng.integers(0, n_formats, wild.sum())
        out.append(choice)
    return out


def spearman(x, y) -> float:
    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def r2(pred, meas) -> tuple[float, float]:
    """R² of the prediction as it stands, and after fitting one scale factor (for unitless proxies)."""
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    total = ((meas - meas.mean()) ** 2).sum()
    scale = float(pred @ meas / (pred @ pred)) if pred @ pred > 0 else 0.0
    return float(1 - ((meas - pred) ** 2).sum() / total), float(1 - ((meas - scale * pred) ** 2).sum() / total)


@dataclass
class ScoreRow:
    estimator: str
    spearman: float
    r2: float
    r2_scaled: float
    wall_time_s: float
    peak_rss_bytes: int | None
    cache_hit: bool


def score_estimators(spec: JobSpec, estimators: list[str], n_configs: int, lo_bits: float, hi_bits: float,
                     console: Console) -> tuple[list[ScoreRow], dict]:
    parsed = [(text, *parse_estimator(text)) for text in estimators]
    instances = [(text, get_estimator(name, **params)) for text, name, params in parsed]
    with Stages(console) as stages:
        ws = Workspace.open(spec, stages)
        base = build_problem(ws.model, ws.layers, ws.formats, search=spec.search)
        choices = random_choices(base, n_configs, lo_bits, hi_bits, spec.seed)
        backend = ws.local_runner()
        with stages.stage(f"measure {n_configs} random configs", n_configs) as advance:
            tasks = [EvalTask.config(base.config(c).assignment(), "evaluation") for c in choices]
            measured = [m.loss for m in backend.map(tasks, advance)]
        rows = []
        for text, est in instances:
            table, _, hit = ws.sensitivity(est, stages, backend)
            problem = build_problem(ws.model, ws.layers, ws.formats, table, spec.search)
            pred = [problem.config(c).predicted for c in choices]
            fit, fit_scaled = r2(pred, measured)
            rows.append(ScoreRow(text, spearman(pred, measured), fit, fit_scaled, table.wall_time_s,
                                 table.peak_rss_bytes, hit))
    detail = {
        "configs": [{"avg_bits": base.avg_bits(c), "kl": m} for c, m in zip(choices, measured)],
        "range_bits": [lo_bits, hi_bits],
    }
    return rows, detail
