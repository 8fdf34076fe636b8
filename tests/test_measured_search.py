"""Solvers that measure candidates: evolutionary (pymoo), Optuna (resumable), and `auto`, on a tiny model."""

import json

import pytest
import torch
import yaml

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from helpers import filled_levels
from bitalloc.tasks import CandidateEvaluator, LocalRunner
from bitalloc.formats import Format
from bitalloc.model import list_layers, load_model, select_layers
from bitalloc.pipeline import build_problem
from bitalloc.search import SearchContext, best_within, get_solver
from bitalloc.sensitivity import EstimatorContext, get_estimator
from conftest import tiny_job

FORMATS = (Format(2, 16), Format(3, 16), Format(4, 16), Format(8, 16))


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model = load_model(str(tiny_llama))
    layers = select_layers(list_layers(model))
    levels = filled_levels(model, layers, FORMATS)
    calib = torch.randint(0, 90, (2, 32), generator=torch.Generator().manual_seed(0))
    table = get_estimator("sqnr").estimate(EstimatorContext(model, layers, FORMATS, levels, calib, "h", 0))
    problem = build_problem(model, layers, FORMATS, table)
    return problem, CandidateEvaluator(LocalRunner(model, levels, {"calibration": calib}), screen_tokens=16)


def test_evolutionary_spends_its_evaluations_and_returns_a_measured_front(setup):
    """The front is non-dominated in measured KL (bytes up, KL strictly down), spends at most the screening
    evaluations it was given, includes a config within each anchor, and the same seed gives the same front."""
    problem, evaluate = setup
    anchors = (problem.bytes_at_avg_bits(5.5), problem.bytes_at_avg_bits(7.0))  # w2g16a is 4 bits, w8g16a 10
    ctx = SearchContext(anchors=anchors, seed=1, evaluator=evaluate, evaluations=40)
    result = get_solver("evolutionary", population=8, offspring=4, validate=6).front(problem, ctx)
    front = list(result.configs)
    assert result.solver == "evolutionary"
    assert 0 < result.evaluations["screen"] <= 40 and 0 < result.evaluations["full"] <= 6 + len(anchors)
    kl = evaluate(front, "full")
    assert [c.bytes for c in front] == sorted(c.bytes for c in front)
    assert all(a > b for a, b in zip(kl, kl[1:]))
    assert all(best_within(front, b) is not None for b in anchors)
    again = get_solver("evolutionary", population=8, offspring=4, validate=6).front(problem, ctx)
    assert [c.key() for c in again.configs] == [c.key() for c in front]


def test_measuring_solvers_refuse_without_evaluations(setup):
    problem, evaluate = setup
    for name in ("evolutionary", "optuna"):
        with pytest.raises(BitallocError) as exc:
            get_solver(name).front(problem, SearchContext(evaluator=evaluate, evaluations=0))
        assert exc.value.field == "search.evaluations"


def test_optuna_study_resumes_from_its_storage(setup, tmp_path):
    problem, evaluate = setup
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = get_solver("optuna", storage=storage, seeds=4, validate=4)
    first.front(problem, SearchContext(evaluator=evaluate, evaluations=10, seed=0))
    study = first.study(problem, 0)
    assert len(study.trials) == 10
    numbers = [t.number for t in study.trials]
    second = get_solver("optuna", storage=storage, seeds=4, validate=4)
    result = second.front(problem, SearchContext(evaluator=evaluate, evaluations=16, seed=0))
    trials = second.study(problem, 0).trials
    assert len(trials) == 16 and [t.number for t in trials[:10]] == numbers
    assert trials[10].number == 10 and result.configs and result.evaluations["screen"] == 6


def test_auto_is_exact_without_evaluations_and_refines_with_them(setup):
    problem, evaluate = setup
    exact = get_solver("dp").front(problem)
    assert [c.key() for c in get_solver("auto").front(problem).configs] == [c.key() for c in exact.configs]
    refined = get_solver("auto", population=6, offspring=3, validate=4).front(
        problem, SearchContext(evaluator=evaluate, evaluations=12, seed=0))
    assert refined.solver == "evolutionary" and refined.evaluations["screen"] > 0
    assert refined.configs and all(problem.cheapest() <= c.bytes <= problem.dearest() for c in refined.configs)


def test_job_with_evaluations_pins_and_ties(tiny_llama, text_dir, tmp_path):
    out = tmp_path / "out"
    spec = tiny_job(tiny_llama, text_dir, out, search={
        "solver": "auto", "evaluations": 16, "screen_tokens": 32, "points": 2, "budgets": [5.0, 6.0],
        "params": {"population": 6, "offspring": 3, "validate": 4},
        "pin": {"down_proj": 8}, "tie": [r"self_attn\.[qkv]_proj"],
    })
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    main(["run", str(path)])
    front = json.loads((out / "front.json").read_text())
    assert 0 < front["solver"]["evaluations"]["screen"] <= 16
    for point in (p for p in front["points"] if p["kind"] == "mixed"):  # uniform baselines ignore pins
        layers = json.loads((out / point["config"]).read_text())["layers"]
        assert all(v["bits"] == 8 for k, v in layers.items() if k.endswith("down_proj"))
        for block in (0, 1):
            qkv = {layers[f"model.layers.{block}.self_attn.{p}_proj"]["bits"] for p in "qkv"}
            assert len(qkv) == 1


def test_ilp_job_with_bops_limit(tiny_llama, text_dir, tmp_path):
    out = tmp_path / "out"
    layers = select_layers(list_layers(load_model(str(tiny_llama))))
    numel = sum(l.numel for l in layers)
    spec = tiny_job(tiny_llama, text_dir, out, search={"solver": "ilp", "max_bops": numel * 4 * 16,
                                                       "params": {"sweep": 8}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    main(["run", str(path)])
    front = json.loads((out / "front.json").read_text())
    for point in (p for p in front["points"] if p["kind"] == "mixed"):
        config = json.loads((out / point["config"]).read_text())
        bops = sum(l.numel * config["layers"][l.name]["bits"] * 16 for l in layers)
        assert bops <= numel * 4 * 16
