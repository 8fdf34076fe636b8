"""What the gradient-based estimators share: grads switched on for the chosen layers only, eager
attention while second-order work runs (SDPA has no double backward on CPU), and the LM loss."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bitalloc.errors import BitallocError
from bitalloc.model import LoadedModel, QuantizableLayer


@contextmanager
def differentiable(model: LoadedModel, layers: list[QuantizableLayer], needed_by: str, eager: bool = False):
    """Yield the layers' weights with requires_grad on (everything else off); restore on exit."""
    module = model.module
    config = getattr(module, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = eager and previous not in (None, "eager") and hasattr(module, "set_attn_implementation")
    params = [model.layer_module(layer.name).weight for layer in layers]
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
    """Summed next-token cross-entropy over the batch and the number of predicted tokens.

    labels="data" uses the text's next tokens (empirical Fisher / Hessian of the training loss);
    labels="model" samples them from the model's own distribution (true Fisher, the Hessian of KL at FP).
    """
    out = model.module(batch)
    logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
    if labels == "data":
        target = batch[:, 1:]
    else:
        probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1])
        target = torch.multinomial(probs, 1, generator=generator).reshape(batch.shape[0], -1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    if not loss.requires_grad:
        raise BitallocError("sensitivity.estimator", f"{needed_by!r} needs gradients, but the model's loss does not depend "
                            "differentiably on the selected layers; use 'sqnr' or 'measured'")
    return loss, target.numel()
