"""What a measurement measures, by model kind, and the names it goes by in results.

A causal language model is measured on its next-token distribution: loss KL(FP ‖ quantized) per token,
quality the perplexity. An encoder (or a model whose LM head is not in its checkpoint) is measured on its
final hidden state h: loss the relative MSE Σ‖h_Q − h_FP‖² / Σ‖h_FP‖² over held-out tokens, quality the
mean cosine similarity of h_Q to h_FP. Results name the metric (`front.json` "metric"); config files and
MLflow use its keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import HIDDEN_STATE, NEXT_TOKEN


@dataclass(frozen=True)
class Metric:
    kind: str
    loss: str  # the key of the loss in result rows and MLflow metrics
    quality: str  # the key of the secondary figure
    loss_label: str
    quality_label: str
    quality_name: str  # the FP model's figure in table titles
    loss_axis: str  # the plots' y axis
    quality_format: str  # how tables print the quality
    description: str

    def document(self) -> dict:
        return {"kind": self.kind, "loss": self.loss, "quality": self.quality, "description": self.description}


METRICS = {
    NEXT_TOKEN: Metric(NEXT_TOKEN, "kl", "ppl", "KL", "PPL", "perplexity", "KL to the FP model (nats/token)", ".2f",
                       "kl: KL(FP || quantized) of the next-token distribution, nats per token; ppl: perplexity"),
    HIDDEN_STATE: Metric(HIDDEN_STATE, "rel_mse", "cosine", "rel. MSE", "cosine", "final hidden state cosine",
                         "relative MSE of the final hidden state", ".4f",
                         "rel_mse: sum |h_Q - h_FP|^2 / sum |h_FP|^2 of the final hidden state over held-out tokens; "
                         "cosine: mean cosine similarity of h_Q to h_FP"),
}
