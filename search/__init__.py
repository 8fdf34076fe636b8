"""Solvers: each takes a `Problem` and returns `BitConfig`s (one budget, or the whole proxy front)."""

from . import dp, ilp  # noqa: F401  (each registers its solver)
from .base import SOLVERS, get_solver
from .pareto import best_within, nondominated, spread

__all__ = ["SOLVERS", "best_within", "get_solver", "nondominated", "spread"]
