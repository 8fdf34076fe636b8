"""The solver interface and its registry: solvers are chosen by name in the job spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from bitalloc.errors import BitallocError
from bitalloc.registry import Registry
from bitalloc.types import BitConfig, Problem

Evaluate = Callable[[list[BitConfig], str], list[float]]


@dataclass(frozen=True)
class SearchContext:
    """What a solver may use beyond the Problem.

    `evaluate(configs, fidelity)` measures KL on calibration tokens ("screen": a few tokens, "full":
    all of them); it is None when the job allows no evaluations. `budget` is how many screening
    evaluations a measuring solver may spend. `anchors` are the byte budgets the job asks for: every
    solver's front includes its best config at each of them.
    """

    evaluate: Evaluate | None = None
    budget: int = 0
    anchors: tuple[int, ...] = ()
    seed: int = 0


class Solver(Protocol):
    name: str

    def solve(self, problem: Problem) -> BitConfig:
        """The least predicted error within problem.max_bytes."""

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> list[BitConfig]:
        """Non-dominated configs from the cheapest to the dearest, including ctx.anchors."""


_REGISTRY: Registry[Solver] = Registry("a solver", "search.solver", "search.params")
SOLVERS = _REGISTRY.classes
register = _REGISTRY.register
get_solver = _REGISTRY.create
check_solver = _REGISTRY.check


class MeasuringSolver:
    """A solver whose answers come from measured fronts: one budget is the best front config within it.

    Such a search starts from the exact solver's configs (at the job's budgets and spread over the byte
    range it searches) and ends by measuring the anchors and its best finds at full fidelity."""

    @staticmethod
    def exact_seeds(problem: Problem, ctx: SearchContext, lo: int, hi: int, k: int
                    ) -> tuple[list[BitConfig], list[BitConfig]]:
        """The exact configs at the anchors within [lo, hi], and those plus k exact front configs spread over it."""
        import dataclasses

        from .pareto import spread

        exact = exact_solver_for(problem)
        anchors = [exact.solve(dataclasses.replace(problem, max_bytes=b)) for b in ctx.anchors if lo <= b <= hi]
        proxy = [c for c in exact.front(problem) if lo <= c.bytes <= hi]
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

    def solve(self, problem: Problem, ctx: SearchContext | None = None) -> BitConfig:
        fitting = [c for c in self.front(problem, ctx) if c.bytes <= problem.max_bytes]
        if not fitting:
            raise BitallocError("search.budgets", f"no measured config fits {problem.max_bytes} bytes")
        return fitting[-1]


def check_budget(problem: Problem, max_bytes: int, field: str = "search.budgets") -> None:
    lo, hi = problem.cheapest(), problem.dearest()
    if not lo <= max_bytes <= hi:
        raise BitallocError(
            field,
            f"{max_bytes} bytes ({problem.avg_bits_of_bytes(max_bytes):.3f} avg bits) is outside the feasible range "
            f"{lo}..{hi} bytes ({problem.avg_bits_of_bytes(lo):.3f}..{problem.avg_bits_of_bytes(hi):.3f} avg bits)",
        )


def exact_solver_for(problem: Problem) -> Solver:
    """The DP when bytes are the only limit (exact at every budget in one pass), else the ILP."""
    return get_solver("dp" if problem.max_bops is None and problem.max_latency is None else "ilp")
