import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.search import get_solver, nondominated, spread
from bitalloc.search.constraints import BopsLimit, LatencyLimit
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
    """The least error over every feasible config (pins, ties and every constraint honoured)."""
    best = np.inf
    for choice in itertools.product(*[np.flatnonzero(row) for row in problem.allowed]):
        choice = np.array(choice)
        if problem.feasible(choice, max_bytes):
            best = min(best, float(problem.error[np.arange(len(choice)), choice].sum()))
    return best


@st.composite
def constrained(draw, second: bool):
    """Problems with tied groups, pinned layers and, if `second`, a BOPs limit."""
    base = draw(problems())
    n = len(base.layers)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    order = rng.permutation(n)
    groups, i = [], 0
    while i < n - 1 and draw(st.booleans()):
        size = int(rng.integers(2, 4))
        groups.append(tuple(sorted(int(x) for x in order[i:i + size])))
        i += size
    groups = [g for g in groups if len(g) > 1]
    allowed = base.allowed.copy()
    for g in groups:
        shared = np.logical_and.reduce(allowed[list(g)])
        if not shared.any():
            allowed[list(g)] = True
    limits = ()
    if second:
        bops = rng.integers(1, 50, base.cost.shape)
        limits = (BopsLimit(bops, int(bops.min(1).sum() + rng.random() * (bops.max(1).sum() - bops.min(1).sum()))),)
    return dataclasses.replace(base, allowed=allowed, groups=tuple(groups), limits=limits)


@settings(max_examples=60, deadline=None)
@given(problem=constrained(second=True), frac=st.floats(0, 1))
def test_ilp_equals_brute_force_with_ties_pins_and_a_second_constraint(problem, frac):
    budget = int(problem.cheapest() + frac * (problem.dearest() - problem.cheapest()))
    expected = brute_force(problem, budget)
    solver = get_solver("ilp")
    if np.isinf(expected):
        with pytest.raises(BitallocError):
            solver.solve(problem, budget)
        return
    result = solver.solve(problem, budget)
    assert problem.feasible(problem.choice(result.config), budget)
    assert result.config.predicted == pytest.approx(expected, abs=result.bound + 1e-9)


@settings(max_examples=60, deadline=None)
@given(problem=constrained(second=False), frac=st.floats(0, 1))
def test_dp_equals_brute_force_with_ties_and_pins(problem, frac):
    budget = int(problem.cheapest() + frac * (problem.dearest() - problem.cheapest()))
    config = get_solver("dp").solve(problem, budget).config
    assert problem.feasible(problem.choice(config), budget)
    assert config.predicted == pytest.approx(brute_force(problem, budget), abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(problem=constrained(second=False))
def test_ilp_sweep_front_is_non_dominated_and_monotone(problem):
    front = get_solver("ilp", sweep=16).front(problem).configs
    sizes = [c.bytes for c in front]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(a.predicted > b.predicted for a, b in zip(front, front[1:]))
    for c in front:
        assert c.predicted == pytest.approx(brute_force(problem, c.bytes), abs=1e-6)


def test_infeasible_ilp_names_the_binding_constraint():
    bops = np.array([[1, 5], [1, 5]])
    problem = Problem(("a", "b"), FORMATS[:2], np.array([8, 8]), np.array([[10, 20], [10, 20]]),
                      np.array([[1.0, 0.5], [1.0, 0.5]]), np.ones((2, 2), bool), fixed_bytes=0,
                      limits=(BopsLimit(bops, 1),))
    with pytest.raises(BitallocError) as exc:
        get_solver("ilp").solve(problem, 30)
    assert exc.value.field == "search.max_bops" and "feasible range 2..10" in exc.value.message
    ok = dataclasses.replace(problem, limits=(BopsLimit(bops, 6),))
    with pytest.raises(BitallocError) as exc:
        get_solver("ilp").solve(ok, 15)
    assert exc.value.field == "search.budgets" and "feasible range 20..40 bytes" in exc.value.message


def test_ilp_holds_a_latency_limit_from_a_measured_table(tmp_path):
    """`search.max_latency` with a `bitalloc latency` table: the ILP's config is the least-error one whose summed
    seconds stay within the limit, rounding included; an unreachable limit names the latency field and range."""
    import json

    from bitalloc.model import QuantizableLayer
    from bitalloc.search.constraints import Constraints

    layers = [QuantizableLayer(f"m.{i}.proj", 64, 64 * (i + 1), "float32") for i in range(3)]
    seconds = {2: 1.0e-5, 3: 1.2e-5, 4: 1.5e-5, 8: 3.0e-5}
    table = tmp_path / "latency.json"
    table.write_text(json.dumps({"schema": "bitalloc.latency/1", "device": "test", "entries": [
        {"out": l.out_features, "in": l.in_features, "format": f.name, "seconds": seconds[f.bits] * (i + 1)}
        for i, l in enumerate(layers) for f in FORMATS]}))
    limits = Constraints(max_latency=7.0e-5, latency_table=str(table)).limits(layers, FORMATS)
    assert isinstance(limits[0], LatencyLimit)
    cost = np.array([[l.numel * f.bits // 8 for f in FORMATS] for l in layers], dtype=np.int64)
    error = np.array([[1.0, 0.4, 0.1, 0.0]] * 3) * np.array([[3.0], [2.0], [1.0]])
    problem = Problem(tuple(l.name for l in layers), FORMATS, np.array([l.numel for l in layers]), cost, error,
                      np.ones((3, 4), bool), 0, limits=limits)
    result = get_solver("ilp").solve(problem, problem.dearest())
    choice = problem.choice(result.config)
    assert limits[0].usage[np.arange(3), choice].sum() <= 7.0e-5
    assert result.config.predicted == pytest.approx(brute_force(problem, problem.dearest()), abs=result.bound + 1e-9)
    assert result.config.predicted > 0  # the limit binds: all-8-bit would be 1.8e-4 s
    with pytest.raises(BitallocError) as exc:
        get_solver("ilp").solve(dataclasses.replace(problem, limits=(LatencyLimit(limits[0].usage, 1e-6),)),
                                problem.dearest())
    assert exc.value.field == "search.max_latency" and "feasible range 6e-05..0.00018 s" in exc.value.message


def test_dp_refuses_constraints_it_cannot_hold():
    problem = Problem(("a",), FORMATS[:2], np.array([8]), np.array([[10, 20]]), np.array([[1.0, 0.5]]),
                      np.ones((1, 2), bool), 0, limits=(BopsLimit(np.array([[1, 2]]), 1),))
    with pytest.raises(BitallocError) as exc:
        get_solver("dp").front(problem)
    assert "ilp" in exc.value.message


def test_conflicting_pins_and_ties_are_refused():
    allowed = np.array([[True, False], [False, True]])
    with pytest.raises(BitallocError) as exc:
        Problem(("a", "b"), FORMATS[:2], np.array([8, 8]), np.ones((2, 2), np.int64), np.ones((2, 2)), allowed, 0,
                groups=((0, 1),))
    assert exc.value.field == "search.pin" and "a, b" in exc.value.message


@settings(max_examples=60, deadline=None)
@given(problem=problems(), frac=st.floats(0, 1))
def test_dp_equals_brute_force(problem, frac):
    budget = int(problem.cheapest() + frac * (problem.dearest() - problem.cheapest()))
    config = get_solver("dp").solve(problem, budget).config
    assert config.bytes <= budget
    assert config.predicted == pytest.approx(brute_force(problem, budget), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_dp_front_is_the_optimum_at_every_budget(problem):
    front = list(get_solver("dp").front(problem).configs)
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
    budget = int(problem.cheapest() + frac * (problem.dearest() - problem.cheapest()))
    result = get_solver("dp", max_states=5).solve(problem, budget)
    config = result.config
    assert config.bytes <= budget
    tighter = budget - result.slack_bytes
    if tighter >= problem.cheapest():
        assert config.predicted <= brute_force(problem, tighter) + 1e-9


def test_budget_outside_range_names_the_range():
    problem = Problem(("a",), FORMATS[:2], np.array([8]), np.array([[10, 20]]), np.array([[1.0, 0.5]]),
                      np.ones((1, 2), bool), fixed_bytes=5)
    with pytest.raises(BitallocError) as exc:
        get_solver("dp").solve(problem, 14)
    assert "15..25 bytes" in exc.value.message


def test_spread_picks_distinct_interior_points():
    problem = Problem(tuple("abcd"), FORMATS, np.full(4, 64), np.tile(np.array([16, 24, 32, 64]), (4, 1)),
                      np.tile(np.array([8.0, 4.0, 2.0, 0.1]), (4, 1)) * np.arange(1, 5)[:, None],
                      np.ones((4, 4), bool), fixed_bytes=0)
    front = get_solver("dp").front(problem).configs
    picked = spread(front, 3)
    lo, hi = front[0].bytes, front[-1].bytes
    # each the best config within its quarter of the byte range: distinct, in order, one per target
    assert [c.bytes for c in picked] == sorted({c.bytes for c in picked}) and len(picked) == 3
    for i, c in enumerate(picked, 1):
        target = lo + (hi - lo) * i / 4
        assert c.bytes <= target and not any(c.bytes < f.bytes <= target for f in front)


def test_unknown_solver_lists_the_allowed():
    with pytest.raises(BitallocError) as exc:
        get_solver("simplex")
    assert exc.value.field == "search.solver" and "dp" in exc.value.message


@settings(max_examples=30, deadline=None)
@given(problem=constrained(second=False), fracs=st.lists(st.floats(0, 1), min_size=1, max_size=3))
def test_thinned_dp_front_is_exact_at_its_anchors(problem, fracs):
    from bitalloc.search import SearchContext, best_within

    anchors = tuple(int(problem.cheapest() + f * (problem.dearest() - problem.cheapest())) for f in fracs)
    front = get_solver("dp", sweep=2).front(problem, SearchContext(anchors=anchors)).configs
    assert len(front) <= 2 + len(anchors)
    for budget in anchors:
        assert best_within(front, budget).predicted == pytest.approx(brute_force(problem, budget), abs=1e-9)


@settings(max_examples=15, deadline=None)
@given(problem=constrained(second=True))
def test_ilp_warm_started_sweep_reaches_the_same_optima(problem):
    plain = get_solver("ilp", sweep=8).front(problem).configs
    warm = get_solver("ilp", sweep=8, warm_start=True).front(problem).configs
    assert [(c.bytes, round(c.predicted, 9)) for c in plain] == [(c.bytes, round(c.predicted, 9)) for c in warm]


def test_renamed_solver_parameters_name_the_new_key():
    for solver, old in (("dp", "points"), ("ilp", "budgets")):
        with pytest.raises(BitallocError) as exc:
            get_solver(solver, **{old: 8})
        assert exc.value.field == f"search.params.{old}" and "'sweep'" in exc.value.message


def test_solvers_report_what_they_found_and_keep_nothing():
    """Bound, slack and wall time come back in the result; two runs of one solver share no state."""
    problem = Problem(tuple("ab"), FORMATS[:2], np.full(2, 64), np.array([[10, 20], [10, 20]]),
                      np.array([[1.0, 0.5], [2.0, 0.1]]), np.ones((2, 2), bool), fixed_bytes=0)
    dp = get_solver("dp")
    before = dict(vars(dp))
    first, second = dp.front(problem), dp.front(problem)
    assert vars(dp) == before and first.configs == second.configs
    assert first.solver == "dp" and first.slack_bytes == 0
    ilp = get_solver("ilp").solve(problem, 30)
    assert ilp.solver == "ilp" and 0 < ilp.bound < 1e-6 and ilp.config.bytes == 30
