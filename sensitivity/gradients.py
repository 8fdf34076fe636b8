"""What the gradient-based estimators share: grads switched on for the chosen layers only, eager
attention while second-order work runs (SDPA has no double backward on CPU), and the LM loss."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bitalloc.errors import BitallocError
from bitalloc.hooks import logits as lm_logits
from bitalloc.model import HIDDEN_STATE, LoadedModel, QuantizableLayer


@contextmanager
def differentiable(model: LoadedModel, layers: list[QuantizableLayer], needed_by: str, eager: bool = False):
    """Yield the parameters holding the layers' weights, each once (a fused [gate; up] holds two), with
    requires_grad on (everything else off); restore on exit. `LoadedModel.view` takes a layer's part of one."""
    module = model.module
    config = getattr(module, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = eager and previous not in (None, "eager") and hasattr(module, "set_attn_implementation")
    params = unique_parameters(model, layers)
    if not all(p.is_floating_point() for p in params):
        raise BitallocError("sensitivity.estimator", f"{needed_by!r} needs gradients, but the model's weights are not floating point")
    try:
        if switch:
            module.set_attn_implementation("eager")
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if switch:
            module.set_attn_implementation(previous)


def lm_loss(model: LoadedModel, batch: torch.Tensor, labels: str = "data",
            generator: torch.Generator | None = None, needed_by: str = "") -> tuple[torch.Tensor, int]:
    """The loss whose curvature the estimators read, summed over the batch, and the number of tokens it covers.

    Next-token models: cross-entropy; labels="data" uses the text's next tokens (empirical Fisher / Hessian of
    the training loss), labels="model" samples them from the model's own distribution (true Fisher, the Hessian
    of KL at FP). Hidden-state models (encoders) have no labels: targets are always drawn from the model,
    y = h + ε with ε ~ N(0, σ²I), σ² = E‖h‖²/2, and the loss is the Gaussian NLL ‖h − y‖²/(2σ²); its Fisher is
    JᵀJ/σ², so ½ΔWᵀFΔW = ‖Δh‖²/E‖h‖², the hidden-state metric's relative MSE per token.
    """
    out = model.module(batch)
    if model.metric == HIDDEN_STATE:
        h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).float()
        sigma2 = h.detach().pow(2).sum(-1).mean() / 2
        noise = torch.randn(h.shape, generator=generator or torch.Generator().manual_seed(0)).to(h.device)
        target = h.detach() + noise * sigma2.sqrt()
        loss = (h - target).pow(2).sum() / (2 * sigma2)
        count = batch.numel()
    else:
        logits = lm_logits(out)[:, :-1].float()
        if labels == "data":
            target = batch[:, 1:]
        else:
            probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1])
            target = torch.multinomial(probs, 1, generator=generator).reshape(batch.shape[0], -1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        count = target.numel()
    if not loss.requires_grad:
        raise BitallocError("sensitivity.estimator", f"{needed_by!r} needs gradients, but the model's loss does not depend "
                            "differentiably on the selected layers; use 'sqnr' or 'measured'")
    return loss, count


def unique_parameters(model: LoadedModel, layers: list[QuantizableLayer]) -> list:
    """The parameters holding the layers' weights, each once (a fused [gate; up] holds two layers)."""
    return list({id(p): p for p in (model.parameter(layer) for layer in layers)}.values())


def per_layer(model: LoadedModel, layers: list[QuantizableLayer], params: list, tensors: list) -> list:
    """Each layer's part ([out, in] / [experts, out, in]) of per-parameter tensors (gradients, accumulators)."""
    where = {id(p): t for p, t in zip(params, tensors)}
    return [model.view(layer, where[id(model.parameter(layer))]) for layer in layers]
