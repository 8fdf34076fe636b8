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
import torch

from bitalloc.evaluate import Evaluator

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
    random = True

    def __init__(self, levels: int = 2, max_tokens: int = 256, batch_size: int = 2):
        self.levels = levels
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def steps(self, ctx: EstimatorContext) -> int:
        return len(ctx.layers)

    def level_indices(self, rel_mse: np.ndarray) -> list[int]:
        """Formats whose relative MSE sets the noise levels: evenly spaced, the coarsest skipped."""
        order = np.argsort(-rel_mse)
        usable = order[1:] if len(order) > self.levels else order
        picks = np.linspace(0, len(usable) - 1, min(self.levels, len(usable))).round().astype(int)
        return [int(usable[i]) for i in dict.fromkeys(picks)]

    def estimate(self, ctx: EstimatorContext):
        evaluator = Evaluator(ctx.model, ctx.weights, ctx.calibration_tokens(self.max_tokens, self.name), self.batch_size)
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        uncertainty = np.zeros_like(values)
        alphas, r2s = [], []
        for i, layer in enumerate(ctx.layers):
            w = ctx.model.layer_module(layer.name).weight.detach()
            norm2 = float(w.float().pow(2).sum())
            rel = np.array([float(ctx.delta(layer, f).pow(2).sum()) / norm2 for f in ctx.formats])
            levels = rel[self.level_indices(rel)]
            deltas = []
            for k, t in enumerate(levels):
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([ctx.seed, i, k]).generate_state(1)[0]))
                noise = torch.randn(w.shape, generator=gen) * (norm2 ** 0.5) * float(np.sqrt(t / w.numel()))
                deltas.append(evaluator.evaluate_tensors({layer.name: (w.float() + noise).to(w.dtype)}).kl)
            alpha, stderr, r2 = fit_through_origin(levels, deltas)
            values[i] = alpha * rel
            uncertainty[i] = stderr * rel
            alphas.append(alpha)
            r2s.append(r2)
            ctx.advance()
        return ctx.table(self, values, uncertainty, alpha=alphas, fit_r2=r2s)
