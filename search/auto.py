"""`auto`: the exact proxy front (dp, or ilp when BOPs/latency limits are set); when the job allows
evaluations, the evolutionary search refines it on measured quality."""

from __future__ import annotations

from bitalloc.types import Problem, SolveResult

from .base import SearchContext, exact_solver_for, register
from .evolutionary import Evolutionary


@register("auto")
class Auto:
    params_of = Evolutionary  # its parameters are the refiner's

    def __init__(self, **evolutionary):
        self.refiner = Evolutionary(**evolutionary)

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> SolveResult:
        if ctx is not None and ctx.evaluator is not None and ctx.evaluations > 0:
            return self.refiner.front(problem, ctx)
        return exact_solver_for(problem).front(problem, ctx)
