"""The solver interface and its registry: solvers are chosen by name in the job spec."""

from __future__ import annotations

from typing import Callable, Protocol

from bitalloc.errors import BitallocError
from bitalloc.types import BitConfig, Problem


class Solver(Protocol):
    name: str

    def solve(self, problem: Problem) -> BitConfig:
        """The least predicted error within problem.max_bytes."""

    def front(self, problem: Problem) -> list[BitConfig]:
        """Every non-dominated (bytes, predicted) config from the cheapest to the dearest."""


SOLVERS: dict[str, Callable[..., Solver]] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        SOLVERS[name] = cls
        return cls

    return wrap


def get_solver(name: str, **params) -> Solver:
    if name not in SOLVERS:
        raise BitallocError("search.solver", f"{name!r} is not a solver; allowed: {', '.join(sorted(SOLVERS))}")
    try:
        return SOLVERS[name](**params)
    except TypeError as exc:
        raise BitallocError("search.params", f"{name}: {exc}") from None


def check_budget(problem: Problem, max_bytes: int, field: str = "search.budgets") -> None:
    lo, hi = problem.cheapest(), problem.dearest()
    if not lo <= max_bytes <= hi:
        raise BitallocError(
            field,
            f"{max_bytes} bytes ({problem.avg_bits_of_bytes(max_bytes):.3f} avg bits) is outside the feasible range "
            f"{lo}..{hi} bytes ({problem.avg_bits_of_bytes(lo):.3f}..{problem.avg_bits_of_bytes(hi):.3f} avg bits)",
        )
