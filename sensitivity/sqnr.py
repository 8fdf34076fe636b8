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

from .base import EstimatorBase, EstimatorContext, register


def _second_moments(ctx: EstimatorContext, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    moments: dict[str, torch.Tensor] = {}
    count = 0

    def hook(name):
        def fn(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            moments[name] = moments.get(name, 0) + x.t() @ x

        return fn

    handles = [ctx.model.layer_module(l.name).register_forward_hook(hook(l.name)) for l in ctx.layers]
    try:
        with torch.no_grad():
            for seq in tokens.split(1):
                ctx.model.module(seq)
                count += seq.numel()
    finally:
        for h in handles:
            h.remove()
    return {name: m / count for name, m in moments.items()}


@register("sqnr")
class SQNR(EstimatorBase):
    def __init__(self, activations: bool = False, max_tokens: int = 2048):
        self.activations = activations
        self.max_tokens = max_tokens

    @property
    def uses_data(self) -> bool:
        return self.activations

    def estimate(self, ctx: EstimatorContext):
        sigma = _second_moments(ctx, ctx.calibration_tokens(self.max_tokens, "sqnr")) if self.activations else None
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        for i, layer in enumerate(ctx.layers):
            w = ctx.model.weight(layer).detach().float()
            s = sigma[layer.name] if sigma is not None else None
            signal = float((w @ s * w).sum()) if s is not None else float(w.pow(2).sum())
            for j, fmt in enumerate(ctx.formats):
                d = ctx.delta(layer, fmt)
                d = d.t() if layer.transposed else d
                noise = float((d @ s * d).sum()) if s is not None else float(d.pow(2).sum())
                values[i, j] = noise / (signal or 1.0)
            ctx.advance()
        return ctx.table(self, values)
