"""Solvers: each takes a `Problem` and returns a `SolveResult` (one budget's config, or the whole front); a new solver
is one module here under `@register` (found by discovery)."""

from bitalloc.registry import discover

from .base import SOLVERS, SearchContext, get_solver
from .pareto import best_within, nondominated, spread

discover(__name__, __path__)

__all__ = ["SOLVERS", "SearchContext", "best_within", "get_solver", "nondominated", "spread"]
