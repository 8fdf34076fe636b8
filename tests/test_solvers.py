import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.search import get_solver, nondominated, spread
from bitalloc.types import Problem

FORMATS = tuple(Format(b) for b in (2, 3, 4, 8))


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 5))
    n_formats = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    cost = np.sort(rng.integers(1, 60, (n_layers, n_formats)), 1) * draw(st.sampled_from([1, 7, 64]))
    error = -np.sort(-rng.random((n_layers, n_formats)), 1) if draw(st.booleans()) else rng.random((n_layers, n_formats))
    allowed = rng.random((n_layers, n_formats)) < 0.8
    allowed[np.arange(n_layers), rng.integers(0, n_formats, n_layers)] = True
    return Problem(
        layers=tuple(f"l{i}" for i in range(n_layers)),
        formats=FORMATS[:n_formats],
        numel=np.full(n_layers, 64, dtype=np.int64),
        cost=cost.astype(np.int64),
        error=error,
        allowed=allowed,
        fixed_bytes=int(rng.integers(0, 1000)),
    )


def brute_force(problem: Problem, max_bytes: int) -> float:
    options = [np.flatnonzero(row) for row in problem.allowed]
    best = np.inf
    for choice in itertools.product(*options):
        choice = np.array(choice)
        if problem.total_bytes(choice) <= max_bytes:
            best = min(best, float(problem.error[np.arange(len(choice)), choice].sum()))
    return best


@settings(max_examples=60, deadline=None)
@given(problem=problems(), frac=st.floats(0, 1))
def test_dp_equals_brute_force(problem, frac):
    budget = int(problem.cheapest() + frac * (problem.dearest() - problem.cheapest()))
    config = get_solver("dp").solve(dataclasses.replace(problem, max_bytes=budget))
    assert config.bytes <= budget
    assert config.predicted == pytest.approx(brute_force(problem, budget), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_dp_front_is_the_optimum_at_every_budget(problem):
    front = get_solver("dp").front(problem)
    sizes = [c.bytes for c in front]
    losses = [c.predicted for c in front]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert nondominated(front) == front
    for budget in range(problem.cheapest(), problem.dearest() + 1, max(1, (problem.dearest() - problem.cheapest()) // 25)):
        best = [c for c in front if c.bytes <= budget][-1]
        assert best.predicted == pytest.approx(brute_force(problem, budget), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(problem=problems(), frac=st.floats(0, 1))
def test_coarse_dp_keeps_budgets_and_its_stated_bound(problem, frac):
    solver = get_solver("dp", max_states=5)
    budget = int(problem.cheapest() + frac * (problem.dearest() - problem.cheapest()))
    config = solver.solve(dataclasses.replace(problem, max_bytes=budget))
    assert config.bytes <= budget
    tighter = budget - solver.slack_bytes
    if tighter >= problem.cheapest():
        assert config.predicted <= brute_force(problem, tighter) + 1e-9


def test_budget_outside_range_names_the_range():
    problem = Problem(("a",), FORMATS[:2], np.array([8]), np.array([[10, 20]]), np.array([[1.0, 0.5]]),
                      np.ones((1, 2), bool), fixed_bytes=5)
    with pytest.raises(BitallocError) as exc:
        get_solver("dp").solve(dataclasses.replace(problem, max_bytes=14))
    assert "15..25 bytes" in exc.value.message


def test_spread_picks_distinct_interior_points():
    problem = Problem(tuple("abcd"), FORMATS, np.full(4, 64), np.tile(np.array([16, 24, 32, 64]), (4, 1)),
                      np.tile(np.array([8.0, 4.0, 2.0, 0.1]), (4, 1)) * np.arange(1, 5)[:, None],
                      np.ones((4, 4), bool), fixed_bytes=0)
    front = get_solver("dp").front(problem)
    picked = spread(front, 3)
    assert 1 <= len(picked) <= 3
    assert len({c.key() for c in picked}) == len(picked)
    assert all(front[0].bytes <= c.bytes <= front[-1].bytes for c in picked)


def test_unknown_solver_lists_the_allowed():
    with pytest.raises(BitallocError) as exc:
        get_solver("simplex")
    assert exc.value.field == "search.solver" and "dp" in exc.value.message
