"""Measure a config: KL(FP || quantized) per token and perplexity on held-out tokens.

The FP reference (log-probabilities over the vocabulary) is computed once. A config is applied streamed: each
quantized layer takes its level's dequantized weight from `Levels` as it runs and gives it back after, so no
dequantized copy of the whole model at every format is ever held; on a GPU worker a layer is swapped for a
`QuantLinear` over its packed level instead. The original weights are restored afterwards.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterable, Mapping

import torch

from bitalloc.kernels.packed import PackedWeight
from bitalloc.kernels.quant_linear import QuantLinear

from .formats import Format
from .hooks import logits, module_hooks
from .quantizers.store import Levels
from .model import HIDDEN_STATE, LoadedModel
from .types import Measurement


def model_output(model: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """What the model's metric reads, in float32: next-token log-probabilities, or the final hidden state."""
    out = model.module(batch)
    if model.metric == HIDDEN_STATE:
        return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).float()
    return torch.log_softmax(logits(out).float(), -1)


REFERENCE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def output_width(model: LoadedModel) -> int:
    """Floats per token the metric reads: the vocabulary (next-token) or the hidden size (hidden state)."""
    if model.metric == HIDDEN_STATE:
        return model.module.config.hidden_size
    head = model.module.get_output_embeddings() if hasattr(model.module, "get_output_embeddings") else None
    return head.out_features if head is not None else 0


def reference_bytes(model: LoadedModel, tokens: int, precision: str = "float32") -> int:
    """What an evaluator's FP reference holds for `tokens` tokens: the metric's floats per token, at `precision`."""
    return tokens * output_width(model) * (2 if precision == "float16" else 4)


def rounding_bound(lp_stored: torch.Tensor, lq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per token, a bound on |KL computed from log-probabilities rounded to `dtype` − KL from exact ones|.

    With lp̂ = lp + δ, |δ| ≤ D = u|lp̂|/(1−u) + (half the smallest subnormal) for unit roundoff u, and p̂ = p·e^δ:
    KL̂ − KL = Σ p[(e^δ − 1)(lp − lq) + e^δ·δ], so |KL̂ − KL| ≤ Σ p̂·e^D[(e^D − 1)(|lp̂ − lq| + D) + e^D·D]."""
    info = torch.finfo(dtype)
    u = info.eps / 2
    d = lp_stored.abs() * (u / (1 - u)) + info.smallest_normal * info.eps / 2
    e = d.exp()
    return (lp_stored.exp() * e * ((e - 1) * ((lp_stored - lq).abs() + d) + e * d)).sum(-1)


class Evaluator:
    """Held-out loss and quality of configs against the FP model (the model's metric: KL and perplexity, or
    the final hidden state's relative MSE and cosine), with weights from the job's levels.

    Memory: the reference keeps tokens x vocab log-probabilities (4 x 512 x 49152 = 403 MB in float32 on the
    default model), or tokens x hidden float32 states; a config's forward pass holds one batch of outputs at a
    time. With `reference="float16"` (next-token models) it keeps half: every KL is then computed from rounded
    log-probabilities, and each measurement carries `loss_error`, a bound on how far that moves its KL.
    """

    def __init__(self, model: LoadedModel, levels: Levels, tokens: torch.Tensor, batch_size: int = 2,
                 reference: str = "float32"):
        self.model = model
        self.levels = levels
        self.batches = list(tokens.split(batch_size))
        self.reference: list[torch.Tensor] = []
        dtype = REFERENCE_DTYPES[reference]

        def kept(batch):  # the FP outputs measured in float32 (loss 0, exact quality), kept in `dtype`
            out = self._output(batch)
            self.reference.append(out.to(dtype))
            return batch, out, out

        self.fp = self._measure(kept(batch) for batch in self.batches)

    @torch.no_grad()
    def _output(self, batch: torch.Tensor) -> torch.Tensor:
        return model_output(self.model, batch)

    @property
    def reference_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.reference)

    @contextmanager
    def applied(self, tensors: Mapping[str, torch.Tensor | PackedWeight]):
        """Point each named layer's weight at the given tensor (in the form `LoadedModel.stored` gives), or swap the
        layer for a QuantLinear over a packed weight; restore on exit."""
        with ExitStack() as stack:
            for name, tensor in tensors.items():
                if isinstance(tensor, PackedWeight):
                    module = QuantLinear.swap_in(self.model.module, name, tensor)
                    stack.callback(self.model.module.set_submodule, name, module)
                    continue
                stack.callback(self.model.put(self.levels.layers[name], tensor))
            yield

    def _measure(self, triples: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Measurement:
        """The metric over (tokens, reference output, output) batches."""
        if self.model.metric == HIDDEN_STATE:
            return self._measure_hidden(triples)
        kl_sum, nll_sum, bound_sum, n_kl, n_nll = 0.0, 0.0, 0.0, 0, 0
        for batch, ref, lq in triples:
            lp = ref.float()
            # per-token sums first (each row reduced in one fixed order), then float64 over tokens:
            # the result does not depend on how many threads the reduction was split over
            kl_sum += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
            if ref.dtype != torch.float32:
                bound_sum += float(rounding_bound(lp, lq, ref.dtype).double().sum())
            n_kl += batch.numel()
            target = batch[:, 1:]
            nll_sum += float(-lq[:, :-1].gather(-1, target.unsqueeze(-1)).double().sum())
            n_nll += target.numel()
        return Measurement(loss=max(kl_sum / n_kl, 0.0), quality=math.exp(nll_sum / n_nll), tokens=n_kl,
                           loss_error=bound_sum / n_kl)

    def _measure_hidden(self, triples: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Measurement:
        err, signal, cos, n = 0.0, 0.0, 0.0, 0
        for batch, hp, hq in triples:
            err += float((hq - hp).pow(2).sum(-1).double().sum())
            signal += float(hp.pow(2).sum(-1).double().sum())
            cos += float(torch.nn.functional.cosine_similarity(hq, hp, dim=-1).clamp(-1, 1).double().sum())
            n += batch.numel()
        return Measurement(loss=err / (signal or 1.0), quality=cos / n, tokens=n)

    @contextmanager
    def streamed(self, assignment: Mapping[str, Format]):
        """Each named layer runs on its level at the given format: dequantized (through the working set) as its
        module is entered (an expert unit's: the experts module, every projection of it in the assignment), the
        original weight put back as it returns. The token embedding is replaced for the whole block instead: a head
        tied to it is the same tensor, which a runtime stores once for both uses."""
        with ExitStack() as stack:
            whole, modules = {}, {}
            for name, fmt in assignment.items():
                layer = self.levels.layers[name]
                if layer.embedding:
                    whole[name] = self.levels.weight(name, fmt)
                    continue
                modules.setdefault(layer.module_name, []).append((layer, fmt))
            restores: dict[str, list] = {}

            def enter(module_name, _mod, _args):
                restores[module_name] = [self.model.put(layer, self.levels.weight(layer.name, fmt))
                                         for layer, fmt in modules[module_name]]

            def leave(module_name, _mod, _args, _output):
                for restore in reversed(restores.pop(module_name)):
                    restore()

            stack.callback(lambda: [restore() for held in restores.values() for restore in reversed(held)])
            stack.enter_context(module_hooks(self.model, modules, pre=enter, post=leave))
            stack.enter_context(self.applied(whole))
            yield

    def evaluate(self, assignment: Mapping[str, Format]) -> Measurement:
        """Measure a config: each layer at its format, from its level."""
        if self.levels.device is not None:
            # experts and embeddings run dequantized (no fused-MoE or lookup kernel over packed levels here)
            return self.evaluate_tensors({name: self.levels.packed(name, fmt) if fmt.quantized and not fmt.ggml
                                          and not self.levels.layers[name].experts
                                          and not self.levels.layers[name].embedding
                                          else self.levels.weight(name, fmt) for name, fmt in assignment.items()})
        with self.streamed(assignment):
            return self._measure_outputs()

    def evaluate_tensors(self, tensors: Mapping[str, torch.Tensor | PackedWeight]) -> Measurement:
        """Measure the model with some layers' weights replaced (e.g. by noisy ones, or packed levels)."""
        with self.applied(tensors):
            return self._measure_outputs()

    def _measure_outputs(self) -> Measurement:
        return self._measure((batch, ref, self._output(batch)) for batch, ref in zip(self.batches, self.reference))
