"""The estimator interface and its registry: estimators are chosen by name in the job spec.

Every estimator fills a table of layer x format -> predicted increase of the job's loss, the
per-token KL(FP || quantized) (or, for data-free estimators, a unitless proxy of it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.quantizers.store import Levels
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.profiling import PeakRSS
from bitalloc.registry import Parameterised, Registry
from bitalloc.tasks import Backend, LocalRunner, token_subset
from bitalloc.types import SensitivityTable


@dataclass
class EstimatorContext:
    """What every estimator may use; the quantized weights come from the job's levels."""

    model: LoadedModel
    layers: list[QuantizableLayer]
    formats: tuple[Format, ...]
    levels: Levels
    calibration: torch.Tensor
    data_hash: str
    seed: int
    backend: Backend | None = None
    progress: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = LocalRunner(self.model, self.levels, {"calibration": self.calibration})

    def advance(self, n: int = 1) -> None:
        if self.progress:
            self.progress(n)

    def calibration_tokens(self, max_tokens: int, needed_by: str) -> torch.Tensor:
        """Whole calibration sequences up to max_tokens (one sequence cut to max_tokens if longer)."""
        if self.calibration.numel() == 0:
            raise BitallocError("data.calibration", f"{needed_by!r} needs calibration sequences; set it to 1 or more")
        return token_subset(self.calibration, max_tokens)

    def delta(self, layer: QuantizableLayer, fmt: Format) -> torch.Tensor:
        """Q_f(W) − W as [out, in] ([experts, out, in]), in float32 (made on each call: hold it only as long as
        needed)."""
        q = self.model.logical(layer, self.levels.weight(layer.name, fmt, keep=False))
        return q.float() - self.model.weight(layer).detach().float()

    def table(self, estimator: "Estimator", values, uncertainty=None, **params) -> SensitivityTable:
        return SensitivityTable(
            layers=tuple(layer.name for layer in self.layers),
            formats=self.formats,
            values=values,
            estimator=estimator.name,
            params={**estimator.params(), **params},
            version=estimator.version,
            data_hash=self.data_hash if estimator.uses_data else None,
            uncertainty=uncertainty,
        )


class Estimator(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]
    uses_data: bool
    random: bool

    def params(self) -> dict: ...

    def steps(self, ctx: EstimatorContext) -> int: ...

    def estimate(self, ctx: EstimatorContext) -> SensitivityTable: ...


class EstimatorBase(Parameterised):
    """Parameters are the fields of the class's `Params` model (`registry.Parameterised`); they and `version` key
    the table cache. Raise `version` whenever a change alters the numbers an estimator computes, so tables cached
    by the old code are not served for the new."""

    version: ClassVar[int] = 1
    uses_data = True
    random = False
    measures_calibration = False  # evaluates configs on calibration tokens (their FP reference is held)

    def steps(self, ctx: EstimatorContext) -> int:
        """Progress units the estimate reports through ctx.advance()."""
        return len(ctx.layers)

    def memory_bytes(self, model: LoadedModel, layers: list[QuantizableLayer], seq_len: int) -> int:
        """Peak this estimator adds beyond the working set (for the job's memory plan): by default one layer's ΔW
        and its error term in float32."""
        return 2 * max((l.numel for l in layers), default=0) * 4


_REGISTRY: Registry[Estimator] = Registry("an estimator", "sensitivity.estimator", "sensitivity.params")
ESTIMATORS = _REGISTRY.classes
register = _REGISTRY.register
get_estimator = _REGISTRY.create
check_estimator = _REGISTRY.check


def graph_bytes(model: LoadedModel, tokens: int) -> int:
    """The autograd graph's saved activations for one sequence of `tokens` tokens, in float32."""
    from bitalloc.evaluate import output_width

    config = getattr(model.module, "config", None)
    hidden = getattr(config, "hidden_size", 0) or 0
    blocks = getattr(config, "num_hidden_layers", 0) or 0
    inter = getattr(config, "intermediate_size", 0) or 4 * hidden
    return tokens * (blocks * (12 * hidden + 4 * inter) + 4 * output_width(model)) * 4


def run_estimator(estimator: Estimator, ctx: EstimatorContext) -> SensitivityTable:
    """Run an estimator, recording its wall time and peak resident memory in the table."""
    with PeakRSS() as peak:
        start = time.perf_counter()
        table = estimator.estimate(ctx)
        table.wall_time_s = time.perf_counter() - start
    table.peak_rss_bytes = peak.bytes
    return table
