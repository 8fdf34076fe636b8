"""The estimator interface and its registry: estimators are chosen by name in the job spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from bitalloc.errors import BitallocError
from bitalloc.evaluate import QuantCache
from bitalloc.formats import Format
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.types import SensitivityTable


@dataclass
class EstimatorContext:
    """What every estimator may use; the quantized weights come from the job's shared cache."""

    model: LoadedModel
    layers: list[QuantizableLayer]
    formats: tuple[Format, ...]
    weights: QuantCache
    calibration: torch.Tensor
    data_hash: str
    seed: int
    progress: Callable[[int], None] | None = None


class Estimator(Protocol):
    name: str

    def estimate(self, ctx: EstimatorContext) -> SensitivityTable: ...


ESTIMATORS: dict[str, Callable[..., Estimator]] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return wrap


def get_estimator(name: str, **params) -> Estimator:
    if name not in ESTIMATORS:
        raise BitallocError("sensitivity.estimator", f"{name!r} is not an estimator; allowed: {', '.join(sorted(ESTIMATORS))}")
    try:
        return ESTIMATORS[name](**params)
    except TypeError as exc:
        raise BitallocError("sensitivity.params", f"{name}: {exc}") from None
