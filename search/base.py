"""The solver contract and its registry: solvers are chosen by name in the job spec.

Every solver answers `front(problem, ctx) -> SolveResult`; the exact ones also `solve(problem, max_bytes)`.
A solver keeps nothing of a run on itself: what it found and how (bound, slack, evaluations, wall time) is in
the result it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from bitalloc.errors import BitallocError
from bitalloc.registry import Registry
from bitalloc.types import BitConfig, Problem, SolveResult


class Evaluate(Protocol):
    def __call__(self, configs: list[BitConfig], fidelity: str) -> list[float]:
        """Measured loss of each config on calibration tokens: "screen" (a few tokens) or "full" (all)."""


@dataclass(frozen=True)
class Termination:
    """When a measuring solver stops: after `evaluations` screening evaluations in all (pymoo's Termination)."""

    evaluations: int

    def remaining(self, done: int) -> int:
        return max(self.evaluations - done, 0)

    def generations(self, first: int, per: int) -> int:
        """Generations of a population search whose first costs `first` evaluations and each next `per`."""
        return 1 + max(self.evaluations - first, 0) // per


class Measure:
    """What a measuring solver evaluates through (pymoo's Evaluator): the loss of configs at a fidelity, each
    (config, fidelity) measured once — repeats and duplicates come from the cache — and counted by fidelity."""

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate
        self.cache: dict[tuple, float] = {}
        self.counts = {"screen": 0, "full": 0}

    def __call__(self, configs: list[BitConfig], fidelity: str) -> list[float]:
        todo = [c for c in {c.key(): c for c in configs}.values() if (c.key(), fidelity) not in self.cache]
        for c, loss in zip(todo, self.evaluate(todo, fidelity) if todo else []):
            self.cache[(c.key(), fidelity)] = loss
        self.counts[fidelity] += len(todo)
        return [self.cache[(c.key(), fidelity)] for c in configs]

    def known(self, config: BitConfig, fidelity: str) -> bool:
        return (config.key(), fidelity) in self.cache


@dataclass(frozen=True)
class SearchContext:
    """What a solver may use beyond the Problem.

    `anchors` are the byte budgets the job asks for: every solver's front includes its best config at each.
    A measuring solver gets its `evaluator` (None when the job allows no evaluations) and may spend
    `evaluations` screening evaluations.
    """

    anchors: tuple[int, ...] = ()
    seed: int = 0
    evaluator: Evaluate | None = None
    evaluations: int = 0

    @property
    def termination(self) -> Termination:
        return Termination(self.evaluations)


class Solver(Protocol):
    name: str

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> SolveResult:
        """Non-dominated configs from the cheapest to the dearest, including ctx.anchors."""


class ExactSolver(Solver, Protocol):
    def solve(self, problem: Problem, max_bytes: int) -> SolveResult:
        """The config of least predicted error within max_bytes (and the problem's limits)."""


_REGISTRY: Registry[Solver] = Registry("a solver", "search.solver", "search.params")
SOLVERS = _REGISTRY.classes
register = _REGISTRY.register
get_solver = _REGISTRY.create
check_solver = _REGISTRY.check


class Stopwatch:
    """Wall time of one solver call, stamped on the result it returns."""

    def __init__(self):
        self.start = time.perf_counter()

    def result(self, solver: str, configs, **found) -> SolveResult:
        return SolveResult(solver, tuple(configs), wall_time_s=round(time.perf_counter() - self.start, 6), **found)


class MeasuringSolver:
    """A solver whose front comes from measured quality: it starts from the exact solver's configs (at the job's
    budgets and spread over the byte range it searches) and ends by measuring the anchors and its best finds at
    full fidelity."""

    @staticmethod
    def measure(ctx: SearchContext | None, name: str, least: int) -> Measure:
        """The counting, caching evaluator of this run (refused where the job allows fewer than `least`)."""
        if ctx is None or ctx.evaluator is None or ctx.evaluations < least:
            raise BitallocError("search.evaluations", f"{name!r} measures candidates; set it to at least {least}")
        return Measure(ctx.evaluator)

    @staticmethod
    def exact_seeds(problem: Problem, ctx: SearchContext, lo: int, hi: int, k: int
                    ) -> tuple[list[BitConfig], list[BitConfig]]:
        """The exact configs at the anchors within [lo, hi], and those plus k exact front configs spread over it."""
        from .pareto import spread

        exact = exact_solver_for(problem)
        anchors = [exact.solve(problem, b).config for b in ctx.anchors if lo <= b <= hi]
        proxy = [c for c in exact.front(problem).configs if lo <= c.bytes <= hi]
        return anchors, list({c.key(): c for c in anchors + spread(proxy, k)}.values())

    @staticmethod
    def validated(anchors: list[BitConfig], finds: list[BitConfig], k: int,
                  measure_full: Callable[[list[BitConfig]], list[float]]) -> list[BitConfig]:
        """The anchors and k finds spread in bytes (finds sorted by bytes), measured at full fidelity; the
        non-dominated ones."""
        from .pareto import nondominated, spread

        candidates = list({c.key(): c for c in anchors + spread(finds, k)}.values())
        full = dict(zip([c.key() for c in candidates], measure_full(candidates)))
        return nondominated(candidates, loss=lambda c: full[c.key()])


def check_budget(problem: Problem, max_bytes: int, field: str = "search.budgets") -> None:
    lo, hi = problem.cheapest(), problem.dearest()
    if not lo <= max_bytes <= hi:
        raise BitallocError(
            field,
            f"{max_bytes} bytes ({problem.avg_bits_of_bytes(max_bytes):.3f} avg bits) is outside the feasible range "
            f"{lo}..{hi} bytes ({problem.avg_bits_of_bytes(lo):.3f}..{problem.avg_bits_of_bytes(hi):.3f} avg bits)",
        )


def exact_solver_for(problem: Problem) -> ExactSolver:
    """The DP when bytes are the only limit (exact at every budget in one pass), else the ILP."""
    return get_solver("ilp" if problem.limits else "dp")
