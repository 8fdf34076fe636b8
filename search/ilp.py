"""Integer linear programming with OR-Tools CP-SAT, proven optimal, every constraint at once.

Variables: one boolean per (item, allowed format), exactly one per item (tied groups are items).
Constraints: whole-model bytes, and when given, bit operations and latency. Latencies (seconds)
enter as integer nanoseconds rounded up, so a config that satisfies the model satisfies the real
limit. The objective is the summed error scaled to integers: each item's error e becomes
round(e·S), S = 2^40 / (largest possible total), so any config's scaled objective is within
n_items/(2S) of its true error and the returned config is within n_items/S of the true optimum
(the result's `bound`, typically 1e-8 of the error's range). CP-SAT runs single-threaded with the
job's seed by default, so the answer is reproducible. Measured on 224 and 700 layers x 6 formats:
`presolve: false` halves the typical proof but has heavy tails (one solve of 18 s), so it stays on;
warm-starting each budget of a sweep from the previous answer (`warm_start: true`, CP-SAT solution
hints) made sweeps 20-25 % slower, so it is off.

An infeasible problem is diagnosed: the message names the constraint that cannot be met given the
others, and the least value it could take.
"""

from __future__ import annotations

import numpy as np
from ortools.sat.python import cp_model

from bitalloc.errors import BitallocError
from bitalloc.types import BitConfig, Items, Problem, SolveResult

from .base import SearchContext, Stopwatch, register
from .pareto import nondominated

BYTES = "bytes"


@register("ilp")
class ILP:
    renamed = {"budgets": "sweep"}

    def __init__(self, time_limit_s: float = 60.0, workers: int = 1, seed: int = 0, sweep: int = 64,
                 presolve: bool = True, warm_start: bool = False):
        self.time_limit_s = time_limit_s
        self.workers = workers
        self.seed = seed
        self.sweep = sweep
        self.presolve = presolve
        self.warm_start = warm_start

    @staticmethod
    def _resources(problem: Problem, items: Items, max_bytes: int | None) -> dict[str, tuple[np.ndarray, int]]:
        """Integer per-(item, format) usage and integer limit of the byte budget and every problem limit."""
        out = {BYTES: (items.cost, max_bytes - problem.fixed_bytes)} if max_bytes is not None else {}
        out.update((limit.name, (limit.integer_usage(usage), limit.integer_limit()))
                   for limit, usage in zip(problem.limits, items.usage))
        return out

    def _model(self, items: Items, resources: dict, objective: np.ndarray, hint: np.ndarray | None = None):
        """The CP-SAT model; `keys[k]` is the (item, format) of boolean `vars_[k]`."""
        model = cp_model.CpModel()
        keys = [(i, int(f)) for i in range(len(items.members)) for f in np.flatnonzero(items.allowed[i])]
        vars_ = [model.NewBoolVar(f"x{i}_{f}") for i, f in keys]
        rows, cols = np.array([k[0] for k in keys]), np.array([k[1] for k in keys])
        bounds = np.searchsorted(rows, np.arange(len(items.members) + 1))
        for start, stop in zip(bounds[:-1], bounds[1:]):
            model.AddExactlyOne(vars_[start:stop])
        for usage, limit in resources.values():
            model.Add(cp_model.LinearExpr.WeightedSum(vars_, usage[rows, cols].tolist()) <= int(limit))
        model.Minimize(cp_model.LinearExpr.WeightedSum(vars_, objective[rows, cols].tolist()))
        if hint is not None:
            for v, i, f in zip(vars_, rows, cols):
                model.AddHint(v, int(hint[i] == f))
        return model, (keys, vars_)

    def _solve(self, model, x, n_items: int) -> tuple[int, np.ndarray | None]:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.time_limit_s
        solver.parameters.num_workers = self.workers
        solver.parameters.random_seed = self.seed
        solver.parameters.cp_model_presolve = self.presolve
        status = solver.Solve(model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return status, None
        choice = np.zeros(n_items, dtype=np.int64)
        for (i, f), v in zip(*x):
            if solver.BooleanValue(v):
                choice[i] = f
        return status, choice

    @staticmethod
    def _scaled(items: Items) -> tuple[np.ndarray, float]:
        """The integer objective and the bound it implies on the returned config's distance from the optimum."""
        worst = float(np.where(items.allowed, np.abs(items.error), 0).max(1).sum()) or 1.0
        scale = 2.0**40 / worst
        return np.where(items.allowed, np.round(items.error * scale), 0).astype(np.int64), len(items.members) / scale

    def solve(self, problem: Problem, max_bytes: int, hint: BitConfig | None = None) -> SolveResult:
        watch = Stopwatch()
        items = problem.items()
        config, bound = self._optimum(problem, items, max_bytes, hint)
        return watch.result(self.name, [config], bound=bound)

    def _optimum(self, problem: Problem, items: Items, max_bytes: int, hint: BitConfig | None
                 ) -> tuple[BitConfig, float]:
        resources = self._resources(problem, items, max_bytes)
        objective, bound = self._scaled(items)
        hint_items = items.contract(problem.choice(hint)) if hint is not None else None
        model, x = self._model(items, resources, objective, hint_items)
        status, choice = self._solve(model, x, len(items.members))
        if choice is None:
            raise self._diagnose(problem, items, resources)
        if status != cp_model.OPTIMAL:
            raise BitallocError("search.params.time_limit_s",
                                f"CP-SAT found a config but no proof of optimality in {self.time_limit_s} s; raise it")
        return problem.config(items.expand(choice)), bound

    def _diagnose(self, problem: Problem, items: Items, resources: dict) -> BitallocError:
        """Name the constraint that cannot be met given the others, with the least value it could take."""
        for name, (usage, limit) in resources.items():
            others = {k: v for k, v in resources.items() if k != name}
            model, x = self._model(items, others, np.where(items.allowed, usage, 0))
            _, choice = self._solve(model, x, len(items.members))
            if choice is None:
                continue
            least = int(usage[np.arange(len(choice)), choice].sum())
            if least > limit:
                most = int(np.where(items.allowed, usage, 0).max(1).sum())
                if name == BYTES:
                    return BitallocError("search.budgets", self._describe_bytes(problem, limit, least, most))
                found = next(lim for lim in problem.limits if lim.name == name)
                return BitallocError(found.field, found.describe(least, most))
        return BitallocError("search", "the constraints cannot be met together")

    @staticmethod
    def _describe_bytes(problem: Problem, limit: int, least: int, most: int) -> str:
        lo, hi, lim = (problem.fixed_bytes + v for v in (least, most, limit))
        return (f"{lim} bytes is below the least reachable under the other constraints; feasible range {lo}..{hi} bytes "
                f"({problem.avg_bits_of_bytes(lo):.3f}..{problem.avg_bits_of_bytes(hi):.3f} avg bits)")

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> SolveResult:
        """Optimal configs at `sweep` byte budgets evenly spaced from the cheapest to the dearest and at
        the anchors (each warm-started from the previous answer if `warm_start`); non-dominated ones kept."""
        watch = Stopwatch()
        items = problem.items()
        lo, hi = problem.cheapest(), problem.dearest()
        anchors = list(ctx.anchors) if ctx else []
        configs, hint, bound = [], None, 0.0
        for budget in np.unique(np.r_[np.linspace(lo, hi, self.sweep).astype(np.int64), anchors]):
            try:
                config, bound = self._optimum(problem, items, int(budget), hint)
            except BitallocError:
                continue
            configs.append(config)
            hint = config if self.warm_start else None
        return watch.result(self.name, nondominated(configs), bound=bound)
