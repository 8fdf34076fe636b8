"""Score estimators by how well they predict: random configs across a range of average bits are
measured (held-out ΔKL), and each estimator's prediction (its table summed over the config's
layers) is compared with the measurements by Spearman ρ and R².
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from bitalloc import configio, pipeline
from bitalloc.errors import BitallocError
from bitalloc.progress import Stages
from bitalloc.sensitivity import ESTIMATORS, get_estimator
from bitalloc.sensitivity import cache as table_cache
from bitalloc.tasks import EvalTask
from bitalloc.types import Problem

from .runner import open_workspace
from .spec import JobSpec

SCORE_SCHEMA = "bitalloc.score/1"


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


def estimator_from(text: str):
    """The estimator `-e TEXT` names, its mistakes reported against `--estimator` (where the user typed them)."""
    name, params = parse_estimator(text)
    try:
        return get_estimator(name, **params)
    except BitallocError as exc:
        where = exc.field.replace("sensitivity.estimator", "--estimator").replace("sensitivity.params", "--estimator")
        raise BitallocError(where, exc.message) from None


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


@dataclass
class Scores:
    rows: list[ScoreRow]
    configs: list[dict]  # each random config's avg_bits and measured loss
    range_bits: tuple[float, float]

    def document(self) -> dict:
        return {"schema": SCORE_SCHEMA, "rows": [asdict(r) for r in self.rows], "configs": self.configs,
                "range_bits": list(self.range_bits)}


def default_estimators() -> list[str]:
    """Every registered estimator at its defaults, and the two variants worth comparing."""
    return sorted(ESTIMATORS) + ["sqnr:activations=true", "fisher:side=weight"]


def tables(spec: JobSpec, estimators: list[str], console: Console, out: Path | None = None
           ) -> list[pipeline.TableResult]:
    """Each estimator's table on the spec's model, data and formats (from the cache where it has them); the one
    table also written to `out` when given."""
    instances = [estimator_from(text) for text in estimators]
    with Stages(console) as stages:
        ws = open_workspace(spec, stages)
        results = [pipeline.sensitivity(ws, est, spec.seed, stages) for est in instances]
    if out is not None:
        configio.write(table_cache.table_document(results[0].table), out)
    return results


def score_estimators(spec: JobSpec, estimators: list[str], n_configs: int, lo_bits: float, hi_bits: float,
                     console: Console, out: Path | None = None) -> Scores:
    instances = [(text, estimator_from(text)) for text in estimators]
    with Stages(console) as stages:
        ws = open_workspace(spec, stages)
        base = spec.problem(ws.model, ws.layers)
        choices = random_choices(base, n_configs, lo_bits, hi_bits, spec.seed)
        backend = ws.local_runner()
        with stages.stage(f"measure {n_configs} random configs", n_configs) as advance:
            tasks = [EvalTask.config(base.config(c).assignment(), "evaluation") for c in choices]
            measured = [m.loss for m in backend.map(tasks, advance)]
        rows, layer_rows = [], np.arange(len(ws.layers))
        for text, est in instances:
            table, _, hit = pipeline.sensitivity(ws, est, spec.seed, stages, backend)
            pred = [float(table.values[layer_rows, c].sum()) for c in choices]  # a config's predicted loss
            fit, fit_scaled = r2(pred, measured)
            rows.append(ScoreRow(text, spearman(pred, measured), fit, fit_scaled, table.wall_time_s,
                                 table.peak_rss_bytes, hit))
    scores = Scores(rows, [{"avg_bits": base.avg_bits(c), "kl": m} for c, m in zip(choices, measured)],
                    (lo_bits, hi_bits))
    if out is not None:
        configio.write(scores.document(), out)
    return scores
