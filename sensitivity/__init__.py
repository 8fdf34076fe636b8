"""Sensitivity estimators: each turns a model and its candidate formats into a `SensitivityTable`."""

from . import fisher, hawq, linearity, measured, sqnr  # noqa: F401  (each registers its estimator)
from .base import ESTIMATORS, EstimatorContext, get_estimator, run_estimator

__all__ = ["ESTIMATORS", "EstimatorContext", "get_estimator", "run_estimator"]
