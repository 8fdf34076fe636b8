"""Fisher: the diagonal curvature of the loss from first-order gradients, no second derivatives.

Weight side (`side: weight`): F = Σₛ gₛ² / N, gₛ the gradient of sequence s's summed next-token loss and
N the number of predicted tokens (token gradients are roughly independent, so E[gₛ²] ≈ Tₛ·per-token
Fisher); entry = ½ · Σ F ⊙ (Q_f(W) − W)².

Output side (the default, as NVIDIA ModelOpt's auto_quantize scores): at each layer output y,
entry = ½ · Σₜ (∂L/∂yₜ)² ⊙ (Q_f(W)·xₜ − W·xₜ)² / N, with the gradient and the inputs of the same
calibration tokens, accumulated per sequence so no activations are stored for the whole set. A token
embedding's output is its looked-up rows, Δyₜ = ΔW[idₜ]: its entry is ½ · Σ G ⊙ ΔW² / N with G[v] the
summed (∂L/∂yₜ)² of the tokens t that looked up v, plus, when a head is tied to it, the head's output term.
An expert unit has no one output (its experts' outputs are mixed by the router): it is scored on the weight
side in the same pass, from the gradients of the tokens routed to each expert.

`labels: data` uses the text's next tokens (empirical Fisher); `labels: model` samples them from the
model's own prediction (the true Fisher, which is the Hessian of KL(FP ‖ Q) at the FP weights).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from bitalloc.hooks import module_hooks
from bitalloc.registry import Params

from .base import EstimatorBase, EstimatorContext, graph_bytes, register
from .gradients import differentiable, lm_loss, per_layer, unique_parameters


@register("fisher")
class Fisher(EstimatorBase):
    class Params(Params):
        side: Literal["output", "weight"] = "output"
        labels: Literal["data", "model"] = "data"
        max_tokens: int = Field(2048, ge=1)

    @property
    def random(self) -> bool:
        return self.labels == "model"

    def memory_bytes(self, model, layers, seq_len: int) -> int:
        """One sequence's backward graph, the largest layer's ΔW and error terms, and the weights' gradients (the
        output side's backward fills them too); plus a float32 Fisher per weight (the weight side: every layer's;
        the output side: the expert units' and the embedding's lookups)."""
        numel = sum(l.numel for l in layers)
        accumulated = numel if self.side == "weight" else sum(l.numel for l in layers if l.experts or l.embedding)
        largest = max((l.numel for l in layers), default=0)
        graph = graph_bytes(model, min(seq_len, self.max_tokens))
        return graph + 3 * largest * 4 + (numel + accumulated) * 4

    def steps(self, ctx: EstimatorContext) -> int:
        return len(ctx.calibration_tokens(self.max_tokens, self.name))

    def estimate(self, ctx: EstimatorContext):
        tokens = ctx.calibration_tokens(self.max_tokens, self.name)
        gen = torch.Generator().manual_seed(ctx.seed)
        if self.side == "weight":
            values, count = self._weight_side(ctx, tokens, gen)
        else:
            values, count = self._output_side(ctx, tokens, gen)
        return ctx.table(self, 0.5 * values / count, tokens=count)

    def _weight_side(self, ctx, tokens, gen):
        count = 0
        with differentiable(ctx.model, ctx.layers, self.name) as params:
            fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            for seq in tokens.split(1):
                loss, n = lm_loss(ctx.model, seq, self.labels, gen, self.name)
                for acc, g in zip(fisher, torch.autograd.grad(loss, params)):
                    acc += g.float().pow(2)
                count += n
                ctx.advance()
        values = np.array([[float((f * ctx.delta(l, fmt).pow(2)).sum()) for fmt in ctx.formats]
                           for l, f in zip(ctx.layers, per_layer(ctx.model, ctx.layers, params, fisher))])
        return values, count

    def _output_side(self, ctx, tokens, gen):
        values = np.zeros((len(ctx.layers), len(ctx.formats)))
        inputs: dict[str, torch.Tensor] = {}

        # the modules whose outputs a unit changes: a layer's own; a tied embedding's head (its lookup apart)
        index = {layer.head if layer.embedding else layer.name: (i, layer) for i, layer in enumerate(ctx.layers)
                 if not layer.experts and (layer.head or not layer.embedding)}
        experts = [(i, layer) for i, layer in enumerate(ctx.layers) if layer.experts]
        lookups = {layer.name: (i, layer, torch.zeros(layer.shape)) for i, layer in enumerate(ctx.layers)
                   if layer.embedding}

        def looked_up(name, _module, args, output):
            ids, acc = args[0].reshape(-1).cpu(), lookups[name][2]

            def backward(grad):
                acc.index_add_(0, ids, grad.detach().reshape(-1, acc.shape[1]).float().pow(2).cpu())

            output.register_hook(backward)

        def forward(name, _module, args, output):
            i, layer = index[name]
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            def backward(grad):
                g2 = grad.detach().reshape(-1, grad.shape[-1]).float().pow(2)
                x = inputs.pop(name)
                for j, fmt in enumerate(ctx.formats):  # ΔW made per use: never every layer's at once
                    d = ctx.delta(layer, fmt)
                    err = x @ d.t()
                    values[i, j] += float((g2 * err.pow(2)).sum())

            output.register_hook(backward)

        count = 0
        with differentiable(ctx.model, ctx.layers, self.name) as params, \
                module_hooks(ctx.model, index, post=forward), module_hooks(ctx.model, lookups, post=looked_up):
            expert_params = unique_parameters(ctx.model, [l for _, l in experts])
            fisher = [torch.zeros_like(p, dtype=torch.float32) for p in expert_params]
            for seq in tokens.split(1):
                loss, n = lm_loss(ctx.model, seq, self.labels, gen, self.name)
                loss.backward()
                for acc, p in zip(fisher, expert_params):
                    acc += p.grad.float().pow(2)
                for p in params:
                    p.grad = None
                count += n
                ctx.advance()
            for (i, layer), f in zip(experts, per_layer(ctx.model, [l for _, l in experts], expert_params, fisher)):
                values[i] = [float((f * ctx.delta(layer, fmt).pow(2)).sum()) for fmt in ctx.formats]
            for i, layer, g2 in lookups.values():
                values[i] += [float((g2 * ctx.delta(layer, fmt).pow(2)).sum()) for fmt in ctx.formats]
        return values, count
