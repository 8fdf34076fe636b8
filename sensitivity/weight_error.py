"""Data-free weight error: relative MSE ‖W − Q_f(W)‖² / ‖W‖² of each layer at each format.

Under the linearity theorem (HIGGS) the loss increase is Σ αₗ·relative MSE; with no data every
αₗ is taken as 1, so this is the linearity estimator's data-free special case. SQNR in dB is
−10·log10 of the same number.
"""

from __future__ import annotations

import time

import numpy as np

from bitalloc.types import SensitivityTable

from .base import EstimatorContext, register


@register("weight_mse")
class WeightMSE:
    def estimate(self, ctx: EstimatorContext) -> SensitivityTable:
        start = time.perf_counter()
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        for i, layer in enumerate(ctx.layers):
            w = ctx.model.layer_module(layer.name).weight.float()
            norm = float(w.pow(2).sum()) or 1.0
            for j, fmt in enumerate(ctx.formats):
                q = ctx.weights.get(layer.name, fmt).float()
                values[i, j] = float((q - w).pow(2).sum()) / norm
            if ctx.progress:
                ctx.progress(1)
        return SensitivityTable(
            layers=tuple(layer.name for layer in ctx.layers),
            formats=ctx.formats,
            values=values,
            estimator=self.name,
            params={},
            data_hash=None,
            wall_time_s=time.perf_counter() - start,
        )
