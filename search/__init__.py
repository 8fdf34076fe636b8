"""Solvers: each takes a `Problem` and returns a `SolveResult` (one budget's config, or the whole front)."""

from . import auto, dp, evolutionary, ilp, optuna_study  # noqa: F401  (each registers its solver)
from .base import SOLVERS, SearchContext, get_solver
from .pareto import best_within, nondominated, spread

__all__ = ["SOLVERS", "SearchContext", "best_within", "get_solver", "nondominated", "spread"]
