"""Sensitivity estimators: each turns a model and its candidate formats into a `SensitivityTable`; a new estimator
is one module here defining an `EstimatorBase` subclass under `@register` (found by discovery)."""

from bitalloc.registry import discover

from .base import ESTIMATORS, EstimatorContext, get_estimator, run_estimator

discover(__name__, __path__)

__all__ = ["ESTIMATORS", "EstimatorContext", "get_estimator", "run_estimator"]
