"""Measure a config: KL(FP || quantized) per token and perplexity on held-out tokens.

The FP reference (log-probabilities over the vocabulary) is computed once. Each config is applied
by pointing every layer's weight at a tensor from the `QuantCache`, so switching configs never
re-quantizes; the original weights are restored afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch

from bitalloc.kernels import fake_quantize
from bitalloc.kernels.packed import PackedWeight, pack_weight
from bitalloc.kernels.quant_linear import QuantLinear

from .formats import Format
from .model import HIDDEN_STATE, LoadedModel, QuantizableLayer
from .profiling import release_freed_memory
from .types import Measurement


class QuantCache:
    """(layer, format) -> dequantized weight in the layer's own dtype and storage layout, or, with
    `packed` (what GPU workers use), the packed weight itself, so a candidate runs on the low-bit
    kernels and the memory held is the real packed size.

    Holds exactly the formats it is given for the layers it is given; `nbytes` says what that costs.
    """

    def __init__(
        self,
        model: LoadedModel,
        layers: list[QuantizableLayer],
        formats: Iterable[Format],
        progress: Callable[[int], None] | None = None,
        store: dict[tuple[str, Format], torch.Tensor] | None = None,
        packed: bool = False,
    ):
        """Quantize every (layer, format), or adopt `store` when given (a worker receiving the driver's cache)."""
        self.model = model
        self.layers = {layer.name: layer for layer in layers}
        self.formats = tuple(formats)
        self._by_name = {f.name: f for f in self.formats}
        self._store: dict[tuple[str, Format], torch.Tensor] = store if store is not None else {}
        for layer in layers if store is None else []:
            w = model.weight(layer)
            for fmt in self.formats:
                if packed and fmt.quantized:
                    self._store[(layer.name, fmt)] = pack_weight(w, fmt)
                    continue
                q = fake_quantize(w, fmt)
                self._store[(layer.name, fmt)] = q.t().contiguous() if layer.transposed else q
            release_freed_memory()
            if progress:
                progress(1)

    def get(self, layer: str, fmt: Format) -> torch.Tensor:
        return self._store[(layer, fmt)]

    def get_named(self, layer: str, format_name: str) -> torch.Tensor:
        """The same, by format name (as tasks carry it)."""
        return self._store[(layer, self._by_name[format_name])]

    @property
    def store(self) -> dict[tuple[str, Format], torch.Tensor]:
        return self._store

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, PackedWeight) else t.numel() * t.element_size()
                   for t in self._store.values())


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def model_output(model: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """What the model's metric reads, in float32: next-token log-probabilities, or the final hidden state."""
    out = model.module(batch)
    if model.metric == HIDDEN_STATE:
        return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).float()
    return torch.log_softmax(_logits(out).float(), -1)


class Evaluator:
    """Held-out loss and quality of configs against the FP model (the model's metric: KL and perplexity, or
    the final hidden state's relative MSE and cosine), with weights from a cache.

    Memory: the reference keeps tokens x vocab float32 log-probabilities (4 x 512 x 49152 = 403 MB
    on the default model), or tokens x hidden float32 states; a config's forward pass holds one batch
    of outputs at a time.
    """

    def __init__(self, model: LoadedModel, weights: QuantCache, tokens: torch.Tensor, batch_size: int = 2):
        self.model = model
        self.weights = weights
        self.batches = list(tokens.split(batch_size))
        self.reference = [self._output(batch) for batch in self.batches]
        self.fp = self._measure(self.reference)

    @torch.no_grad()
    def _output(self, batch: torch.Tensor) -> torch.Tensor:
        return model_output(self.model, batch)

    @property
    def reference_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.reference)

    @contextmanager
    def applied(self, tensors: Mapping[str, torch.Tensor | PackedWeight]):
        """Point each named layer's weight at the given tensor (its storage layout), or swap the layer for
        a QuantLinear over a packed weight; restore on exit."""
        saved, swapped = {}, {}
        try:
            for name, tensor in tensors.items():
                module = self.model.layer_module(name)
                if isinstance(tensor, PackedWeight):
                    swapped[name] = module
                    self.model.module.set_submodule(name, QuantLinear.from_packed(tensor, module.bias,
                                                                                  module.weight.dtype))
                    continue
                saved[name] = module.weight.data
                module.weight.data = tensor
            yield
        finally:
            for name, data in saved.items():
                self.model.layer_module(name).weight.data = data
            for name, module in swapped.items():
                self.model.module.set_submodule(name, module)

    def _measure(self, outputs: Iterable[torch.Tensor]) -> Measurement:
        if self.model.metric == HIDDEN_STATE:
            return self._measure_hidden(outputs)
        kl_sum, nll_sum, n_kl, n_nll = 0.0, 0.0, 0, 0
        for batch, lp, lq in zip(self.batches, self.reference, outputs):
            # per-token sums first (each row reduced in one fixed order), then float64 over tokens:
            # the result does not depend on how many threads the reduction was split over
            kl_sum += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
            n_kl += batch.numel()
            target = batch[:, 1:]
            nll_sum += float(-lq[:, :-1].gather(-1, target.unsqueeze(-1)).double().sum())
            n_nll += target.numel()
        return Measurement(loss=max(kl_sum / n_kl, 0.0), quality=math.exp(nll_sum / n_nll), tokens=n_kl)

    def _measure_hidden(self, outputs: Iterable[torch.Tensor]) -> Measurement:
        err, signal, cos, n = 0.0, 0.0, 0.0, 0
        for batch, hp, hq in zip(self.batches, self.reference, outputs):
            err += float((hq - hp).pow(2).sum(-1).double().sum())
            signal += float(hp.pow(2).sum(-1).double().sum())
            cos += float(torch.nn.functional.cosine_similarity(hq, hp, dim=-1).clamp(-1, 1).double().sum())
            n += batch.numel()
        return Measurement(loss=err / (signal or 1.0), quality=cos / n, tokens=n)

    def evaluate(self, assignment: Mapping[str, Format]) -> Measurement:
        """Measure a config: each layer at its format, weights from the cache."""
        return self.evaluate_tensors({name: self.weights.get(name, fmt) for name, fmt in assignment.items()})

    def evaluate_tensors(self, tensors: Mapping[str, torch.Tensor]) -> Measurement:
        """Measure the model with some layers' weights replaced (e.g. by noisy ones)."""
        with self.applied(tensors):
            return self._measure(self._output(batch) for batch in self.batches)

