"""Exact dynamic programming over the byte budget (multiple-choice knapsack).

Each layer's cost is taken as its extra bytes above its cheapest allowed option, measured in units
of u = gcd of all those extras, so the DP is exact on byte costs while the number of states
(total extra / u + 1) stays within `max_states`. When it does not, u is enlarged and extras are
rounded up to it: every answer still fits its budget, and its predicted error is no worse than the
exact optimum at (budget − slack_bytes), slack_bytes = layers·(u − 1); the result's `slack_bytes`
says which case the run was in (0 = exact).

One pass gives the least error for every budget at once, so the whole front costs one solve.
Tied groups are solved as one item each (summed costs and errors, the formats all members allow).
Only the byte budget is a DP dimension: BOPs or latency limits need the `ilp` solver.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.types import Problem, SolveResult

from .base import SearchContext, Stopwatch, check_budget, register
from .pareto import nondominated


@register("dp")
class DynamicProgramming:
    renamed = {"points": "sweep"}

    def __init__(self, max_states: int = 1_000_000, max_table_bytes: int = 512 * 2**20, sweep: int = 256):
        self.max_states = max_states
        self.max_table_bytes = max_table_bytes
        self.sweep = sweep

    def _tables(self, problem: Problem):
        if problem.limits:
            raise BitallocError("search.solver", "'dp' solves the byte budget only; max_bops and max_latency need 'ilp'")
        items = problem.items()
        n_layers = len(items.members)
        big = np.iinfo(np.int64).max
        base = np.where(items.allowed, items.cost, big).min(1)
        extra = np.where(items.allowed, items.cost - base[:, None], 0)
        positive = [int(x) for x in np.unique(extra) if x > 0]
        unit = reduce(math.gcd, positive, 0) or 1
        limit = max(2, min(self.max_states, self.max_table_bytes // max(n_layers, 1)))
        span = int(extra.max(1).sum())
        if span // unit + 1 > limit:
            unit = math.ceil(span / (limit - 1))
        units = -(-extra // unit)
        slack = 0 if np.all(units * unit == extra) else n_layers * (unit - 1)
        states = int(units.max(1).sum()) + 1

        best = np.full(states, np.inf)
        best[0] = 0.0
        choice = np.zeros((n_layers, states), dtype=np.int8)
        for i in range(n_layers):
            new = np.full(states, np.inf)
            arg = choice[i]
            for j in np.flatnonzero(items.allowed[i]):
                e = int(units[i, j])
                cand = best[: states - e] + items.error[i, j]
                better = cand < new[e:]
                new[e:][better] = cand[better]
                arg[e:][better] = j
            best = new
        return items, int(base.sum()), unit, units, best, choice, slack

    @staticmethod
    def _backtrack(units: np.ndarray, choice: np.ndarray, states: np.ndarray) -> np.ndarray:
        """Per-layer format indices for each end state (vectorised over states)."""
        s = states.copy()
        picks = np.zeros((choice.shape[0], len(s)), dtype=np.int64)
        for i in range(choice.shape[0] - 1, -1, -1):
            picks[i] = choice[i, s]
            s -= units[i, picks[i]]
        return picks.T

    def solve(self, problem: Problem, max_bytes: int) -> SolveResult:
        watch = Stopwatch()
        check_budget(problem, max_bytes)
        items, base, unit, units, best, choice, slack = self._tables(problem)
        cap = min((max_bytes - problem.fixed_bytes - base) // unit, len(best) - 1)
        end = int(np.argmin(best[: cap + 1]))
        config = problem.config(items.expand(self._backtrack(units, choice, np.array([end]))[0]))
        return watch.result(self.name, [config], slack_bytes=slack)

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> SolveResult:
        """The optimum at `sweep` budgets evenly spaced from the cheapest to the dearest config and at
        every anchor, all from one pass (every budget is solved; these are the ones materialized)."""
        watch = Stopwatch()
        items, base, unit, units, best, choice, slack = self._tables(problem)
        previous = np.r_[np.inf, np.minimum.accumulate(best)[:-1]]
        improves = np.flatnonzero(best < previous)
        budgets = np.linspace(0, len(best) - 1, self.sweep).astype(np.int64)
        if ctx is not None and ctx.anchors:
            anchors = (np.array(ctx.anchors) - problem.fixed_bytes - base) // unit
            budgets = np.r_[budgets, anchors[(anchors >= 0) & (anchors < len(best))]]
        ends = np.unique(improves[np.searchsorted(improves, budgets, side="right") - 1])
        picks = self._backtrack(units, choice, ends)
        return watch.result(self.name, nondominated([problem.config(items.expand(p)) for p in picks]),
                            slack_bytes=slack)
