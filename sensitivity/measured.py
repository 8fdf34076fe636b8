"""Measured: the exact ΔKL of quantizing one layer at a time to each format, on calibration tokens.

The most faithful single-layer table and the most expensive (layers × formats evaluations). Each
evaluation is the evaluator's plain `(assignment) -> Measurement` call, the same path candidate
configs take, so it fans out over workers as they do.
"""

from __future__ import annotations

import numpy as np

from bitalloc.evaluate import Evaluator

from .base import EstimatorBase, EstimatorContext, register


@register("measured")
class Measured(EstimatorBase):
    def __init__(self, max_tokens: int = 256, batch_size: int = 2):
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def steps(self, ctx: EstimatorContext) -> int:
        return len(ctx.layers) * len(ctx.formats)

    def estimate(self, ctx: EstimatorContext):
        evaluator = Evaluator(ctx.model, ctx.weights, ctx.calibration_tokens(self.max_tokens, self.name), self.batch_size)
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        for i, layer in enumerate(ctx.layers):
            for j, fmt in enumerate(ctx.formats):
                values[i, j] = evaluator.evaluate({layer.name: fmt}).kl
                ctx.advance()
        return ctx.table(self, values)
