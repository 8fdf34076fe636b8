"""Measured: the exact ΔKL of quantizing one layer at a time to each format, on calibration tokens.

The most faithful single-layer table and the most expensive (layers × formats evaluations). Each
evaluation is a task for the job's backend, the same path candidate configs take, so it fans out
over the job's workers as they do.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field


from bitalloc.registry import Params
from bitalloc.tasks import EvalTask

from .base import EstimatorBase, EstimatorContext, register


@register("measured")
class ExactDelta(EstimatorBase):
    measures_calibration = True
    class Params(Params):
        max_tokens: int = Field(256, ge=1)

    def steps(self, ctx: EstimatorContext) -> int:
        return len(ctx.layers) * len(ctx.formats)

    def estimate(self, ctx: EstimatorContext):
        ctx.calibration_tokens(self.max_tokens, self.name)
        tokens = f"calibration:{self.max_tokens}"
        tasks = [EvalTask.config({layer.name: fmt}, tokens) for layer in ctx.layers for fmt in ctx.formats]
        results = ctx.backend.map(tasks, ctx.progress)
        values = np.array([m.loss for m in results]).reshape(len(ctx.layers), len(ctx.formats))
        return ctx.table(self, values)
