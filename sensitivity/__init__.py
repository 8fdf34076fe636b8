"""Sensitivity estimators: each turns a model and its candidate formats into a `SensitivityTable`."""

from . import weight_error  # noqa: F401  (registers its estimator)
from .base import ESTIMATORS, EstimatorContext, get_estimator

__all__ = ["ESTIMATORS", "EstimatorContext", "get_estimator"]
