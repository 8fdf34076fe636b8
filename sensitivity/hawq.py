"""HAWQ: per-layer Hessian trace by Hutchinson, entry = ½ · Tr(Hₗ)/nₗ · ‖Q_f(Wₗ) − Wₗ‖².

One Hessian-vector product over all chosen layers gives every layer's estimate at once: with a
Rademacher probe v over all their weights, vₗ·(Hv)ₗ has expectation Tr(Hₗ), since the cross terms
vanish in expectation. Probes cycle over calibration micro-batches (one double-backward graph per
micro-batch, `probes_per_batch` probes on it), so the estimate is of the Hessian averaged over the
calibration tokens. Sampling stops when the predicted loss of the middle format, summed over
layers, has a relative standard error ≤ `tol` (or at `max_probes`); each layer's standard error is
reported as the table's uncertainty. A negative trace estimate (the loss Hessian is not positive
semi-definite) predicts no damage and is clamped to 0. The ½ is the second-order Taylor factor,
which puts entries in loss units; it does not change any allocation.

Loss: mean next-token cross-entropy on the calibration tokens. Memory: one micro-batch's
double-backward graph; on SmolLM2-135M with one 512-token sequence the process peaks near 9 GB.

`top_eigenvalue: true` (HAWQ-V1) replaces the trace by the layer's top Hessian eigenvalue from
PyHessian's power iteration, entry = ½ · λₗ · ‖ΔWₗ‖² (an upper bound on the quadratic term).
PyHessian 0.1 computes only whole-model quantities (trace samples, eigenvalues) over whatever
parameters require grad, so the per-layer eigenvalue needs one PyHessian run per layer; its trace
cannot give per-layer values from one pass, which is why the trace path here is our own. A unit that shares its
parameter (gate and up rows of a fused experts `gate_up_proj`) would get the eigenvalue of both units' block from
PyHessian: its power iteration runs here on its own rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from bitalloc.errors import BitallocError
from bitalloc.hooks import logits as lm_logits
from bitalloc.model import HIDDEN_STATE
from bitalloc.registry import Params

from .base import EstimatorBase, EstimatorContext, graph_bytes, register
from .gradients import differentiable, lm_loss, per_layer


def _next_token_loss(out, tokens: torch.Tensor) -> torch.Tensor:
    """The eigenvalue's loss: mean next-token cross-entropy (PyHessian's criterion)."""
    logits = lm_logits(out)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@register("hawq")
class HAWQ(EstimatorBase):
    random = True

    class Params(Params):
        tol: float = Field(0.1, ge=0, description="stop at this relative standard error of the predicted loss")
        min_probes: int = Field(8, ge=2)
        max_probes: int = Field(32, ge=2)
        probes_per_batch: int = Field(4, ge=1)
        max_tokens: int = Field(512, ge=1)
        top_eigenvalue: bool = False
        power_iters: int = Field(20, ge=1)

        @model_validator(mode="after")
        def _probes(self):
            if self.max_probes < self.min_probes:
                raise ValueError(f"max_probes ({self.max_probes}) is below min_probes ({self.min_probes})")
            return self

    def memory_bytes(self, model, layers, seq_len: int) -> int:
        """One double-backward graph (three sequences' worth) and second-order gradients of every weight."""
        return 3 * graph_bytes(model, min(seq_len, self.max_tokens)) + 4 * sum(l.numel for l in layers) * 4

    def steps(self, ctx: EstimatorContext) -> int:
        return len(ctx.layers) if self.top_eigenvalue else self.max_probes

    def estimate(self, ctx: EstimatorContext):
        tokens = ctx.calibration_tokens(self.max_tokens, self.name)
        sq = np.array([[float(ctx.delta(l, f).pow(2).sum()) for f in ctx.formats] for l in ctx.layers])
        numel = np.array([l.numel for l in ctx.layers], dtype=np.float64)
        if self.top_eigenvalue:
            if ctx.model.metric == HIDDEN_STATE:
                raise BitallocError("sensitivity.params.top_eigenvalue", "PyHessian's eigenvalues need a next-token "
                                    "loss; this model is measured on its hidden state: use the trace (false)")
            curvature = np.array([self._top_eigenvalue(ctx, layer, tokens) for layer in ctx.layers])
            return ctx.table(self, 0.5 * np.maximum(curvature, 0)[:, None] * sq, probes=self.power_iters)
        samples = self.trace_samples(ctx, tokens, weights=sq[:, len(ctx.formats) // 2] / numel)
        trace = samples.mean(0)
        stderr = samples.std(0, ddof=1) / np.sqrt(len(samples))
        per_weight = np.maximum(trace, 0) / numel
        return ctx.table(
            self, 0.5 * per_weight[:, None] * sq, 0.5 * (stderr / numel)[:, None] * sq,
            probes=len(samples), trace=trace.tolist(), trace_stderr=stderr.tolist(),
        )

    def trace_samples(self, ctx: EstimatorContext, tokens: torch.Tensor, weights: np.ndarray) -> np.ndarray:
        """Hutchinson samples, one row per probe: vₗ·(Hv)ₗ for every layer from one HVP."""
        gen = torch.Generator().manual_seed(ctx.seed)
        batches = list(tokens.split(1))
        samples: list[list[float]] = []
        with differentiable(ctx.model, ctx.layers, self.name, eager=True) as params:
            step = 0
            while len(samples) < self.max_probes:
                batch = batches[step % len(batches)]
                step += 1
                loss, count = lm_loss(ctx.model, batch, generator=gen, needed_by=self.name)
                grads = torch.autograd.grad(loss / count, params, create_graph=True)
                n = min(self.probes_per_batch, self.max_probes - len(samples))
                for k in range(n):
                    v = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
                    hv = torch.autograd.grad(grads, params, v, retain_graph=k < n - 1)
                    samples.append([float((a * b).sum()) for a, b in zip(per_layer(ctx.model, ctx.layers, params, v),
                                                                         per_layer(ctx.model, ctx.layers, params, hv))])
                    ctx.advance()
                del grads, loss
                if len(samples) >= self.min_probes and self._converged(np.array(samples), weights):
                    break
        return np.array(samples)

    def _converged(self, samples: np.ndarray, weights: np.ndarray) -> bool:
        total = samples @ weights
        mean = abs(total.mean())
        return mean > 0 and total.std(ddof=1) / np.sqrt(len(total)) <= self.tol * mean

    def _top_eigenvalue(self, ctx: EstimatorContext, layer, tokens: torch.Tensor) -> float:
        if layer.rows is not None:
            return self._rows_top_eigenvalue(ctx, layer, tokens)
        from pyhessian import hessian

        torch.manual_seed(ctx.seed)
        with differentiable(ctx.model, [layer], self.name, eager=True):
            h = hessian(ctx.model.module, _next_token_loss, data=(tokens, tokens), cuda=tokens.is_cuda)
            top, _ = h.eigenvalues(maxIter=self.power_iters, tol=1e-3)
        ctx.advance()
        return float(top[0])

    def _rows_top_eigenvalue(self, ctx: EstimatorContext, layer, tokens: torch.Tensor) -> float:
        """PyHessian's power iteration (same loss, same stopping rule) with the probe kept on the layer's rows."""
        gen = torch.Generator().manual_seed(ctx.seed)
        with differentiable(ctx.model, [layer], self.name, eager=True) as (param,):
            loss = _next_token_loss(ctx.model.module(tokens), tokens)
            (grad,) = torch.autograd.grad(loss, param, create_graph=True)
            v = torch.zeros_like(param)
            rows = ctx.model.view(layer, v)  # a view: writing it writes v's rows, the rest stays 0
            rows.copy_(torch.randn(rows.shape, generator=gen))
            top = None
            for _ in range(self.power_iters):
                v /= v.norm()
                (hv,) = torch.autograd.grad(grad, param, v, retain_graph=True)
                hv_rows = ctx.model.view(layer, hv)
                value = float((rows * hv_rows).sum())
                done = top is not None and abs(value - top) / (abs(top) + 1e-6) < 1e-3
                top = value
                if done:
                    break
                rows.copy_(hv_rows)
            del grad, loss
        ctx.advance()
        return top
