"""SQNR: how much of a layer's signal the format's rounding noise costs.

Data-free (default): entry = ‖W − Q_f(W)‖² / ‖W‖², the relative weight MSE (SQNR in dB is
−10·log10 of it). Under the linearity theorem (HIGGS) the loss increase is Σ αₗ·relative MSE;
this is that theorem with every αₗ = 1.

Activation-aware (`activations: true`): entry = E‖X(W − Q_f(W))ᵀ‖² / E‖XWᵀ‖², the relative
output error on calibration inputs, computed from each layer's input second moment Σ = XᵀX / N
as tr(ΔW Σ ΔWᵀ) / tr(W Σ Wᵀ), so no per-format forward pass is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from bitalloc.quantizers.inputs import collect
from bitalloc.registry import Params

from .base import EstimatorBase, EstimatorContext, register


@register("sqnr")
class SQNR(EstimatorBase):
    class Params(Params):
        activations: bool = False
        max_tokens: int = Field(2048, ge=1)

    def memory_bytes(self, model, layers, seq_len: int) -> int:
        """With activations, every layer's input second moments; data-free, one layer's ΔW."""
        if not self.activations:
            return super().memory_bytes(model, layers, seq_len)
        return sum(max(l.experts, 1) * l.in_features ** 2 * 4 for l in layers) + sum(l.numel for l in layers) * 4

    @property
    def uses_data(self) -> bool:
        return self.activations

    def estimate(self, ctx: EstimatorContext):
        sigma = None
        if self.activations:  # XᵀX / N: half the Hessian GPTQ reads
            moments = collect(ctx.model, ctx.layers, ctx.calibration_tokens(self.max_tokens, "sqnr"), "hessian")
            sigma = {name: _half(h) for name, h in moments.items()}
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        for i, layer in enumerate(ctx.layers):
            w = ctx.model.weight(layer).detach().float()
            s = sigma[layer.name] if sigma is not None else None
            signal = _energy(w, s)
            for j, fmt in enumerate(ctx.formats):
                values[i, j] = _energy(ctx.delta(layer, fmt), s) / (signal or 1.0)
            ctx.advance()
        return ctx.table(self, values)


def _half(h):
    """XᵀX / N from 2 XᵀX / N, per expert for an expert unit; None (no moments) stays None."""
    return [_half(x) for x in h] if isinstance(h, list) else None if h is None else h / 2


def _energy(w: torch.Tensor, s) -> float:
    """Σ w Σ wᵀ over rows (‖w‖² without input moments); an expert unit sums its experts, each with its own moments
    (an expert no calibration token reached adds nothing to the output there)."""
    if s is None:
        return float(w.pow(2).sum())
    if w.dim() == 3:
        return sum(_energy(w[e], s[e]) for e in range(w.shape[0]) if s[e] is not None)
    return float((w @ s * w).sum())
