"""Linearity theorem (HIGGS): ΔKL(model) ≈ Σₗ αₗ·tₗ, tₗ = ‖ΔWₗ‖²/‖Wₗ‖² the layer's relative MSE.

For each layer, Gaussian noise W + ε·‖W‖·√(t/numel) is injected at `levels` relative-MSE levels t,
ΔKL(FP ‖ noisy) is measured on calibration tokens, and αₗ is fitted by least squares through the
origin; entry = αₗ · relative MSE of the format. Each fit's R² (uncentered, as for a line through
the origin) and the slope's standard error are reported.

Design, chosen to stay cheap while keeping fits honest:
- the levels are the layer's own relative MSEs at evenly spaced formats of the job, skipping the
  coarsest (whose noise leaves the linear regime first), so the slope is fitted where it is used;
- one layer is perturbed at a time: perturbing several at once would need as many measurements as
  layers to separate the slopes, and correlated cross terms would confound them;
- the FP reference log-probabilities are computed once and shared by every measurement, and
  `max_tokens` calibration tokens (default 256) screen each layer.
Each noise draw comes from a generator seeded by (seed, layer, level), so results do not depend
on the order of measurement.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from bitalloc.registry import Params
from bitalloc.tasks import EvalTask

from .base import EstimatorBase, EstimatorContext, register


def fit_through_origin(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Slope α of y ≈ α·t, its standard error, and the uncentered R²."""
    t, y = np.asarray(t, float), np.asarray(y, float)
    alpha = float(t @ y / (t @ t))
    resid = y - alpha * t
    stderr = float(np.sqrt(resid @ resid / max(len(t) - 1, 1) / (t @ t))) if len(t) > 1 else float("nan")
    r2 = float(1 - resid @ resid / (y @ y)) if y @ y > 0 else 0.0
    return alpha, stderr, r2


@register("linearity")
class Linearity(EstimatorBase):
    measures_calibration = True
    random = True

    class Params(Params):
        levels: int = Field(2, ge=1, description="noise levels fitted per layer")
        max_tokens: int = Field(256, ge=1)

    def steps(self, ctx: EstimatorContext) -> int:
        return len(ctx.layers) * len(self.level_indices(np.zeros(len(ctx.formats))))

    def level_indices(self, rel_mse: np.ndarray) -> list[int]:
        """Formats whose relative MSE sets the noise levels: evenly spaced, the coarsest skipped."""
        order = np.argsort(-rel_mse)
        usable = order[1:] if len(order) > self.levels else order
        picks = np.linspace(0, len(usable) - 1, min(self.levels, len(usable))).round().astype(int)
        return [int(usable[i]) for i in dict.fromkeys(picks)]

    def estimate(self, ctx: EstimatorContext):
        ctx.calibration_tokens(self.max_tokens, self.name)
        tokens = f"calibration:{self.max_tokens}"
        rel, levels, tasks = [], [], []
        for i, layer in enumerate(ctx.layers):
            norm2 = float(ctx.model.weight(layer).detach().float().pow(2).sum())
            rel.append(np.array([float(ctx.delta(layer, f).pow(2).sum()) / norm2 for f in ctx.formats]))
            levels.append(rel[-1][self.level_indices(rel[-1])])
            for k, t in enumerate(levels[-1]):
                seed = int(np.random.SeedSequence([ctx.seed, i, k]).generate_state(1)[0])
                tasks.append(EvalTask(tokens, noise=(layer.name, float(t), seed)))
        done = iter(ctx.backend.map(tasks, ctx.progress))
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        uncertainty = np.zeros_like(values)
        alphas, r2s = [], []
        for i in range(len(ctx.layers)):
            deltas = [next(done).loss for _ in levels[i]]
            alpha, stderr, r2 = fit_through_origin(levels[i], deltas)
            values[i] = alpha * rel[i]
            uncertainty[i] = stderr * rel[i]
            alphas.append(alpha)
            r2s.append(r2)
        return ctx.table(self, values, uncertainty, alpha=alphas, fit_r2=r2s)
