"""Solvers that measure candidates: evolutionary (pymoo), Optuna (resumable), and `auto`, on a tiny model."""

import dataclasses
import json

import pytest
import torch
import yaml

from bitalloc.cli import main
from bitalloc.evaluate import QuantCache
from bitalloc.tasks import CandidateEvaluator, LocalRunner
from bitalloc.formats import Format
from bitalloc.jobs.runner import build_problem
from bitalloc.model import list_layers, load_model, select_layers
from bitalloc.search import SearchContext, get_solver
from bitalloc.sensitivity import EstimatorContext, get_estimator
from conftest import tiny_job

FORMATS = (Format(2, 16), Format(3, 16), Format(4, 16), Format(8, 16))


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model = load_model(str(tiny_llama))
    layers = select_layers(list_layers(model))
    cache = QuantCache(model, layers, FORMATS)
    calib = torch.randint(0, 90, (2, 32), generator=torch.Generator().manual_seed(0))
    table = get_estimator("sqnr").estimate(EstimatorContext(model, layers, FORMATS, cache, calib, "h", 0))
    problem = build_problem(model, layers, FORMATS, table)
    return problem, CandidateEvaluator(LocalRunner(model, cache, {"calibration": calib}), screen_tokens=16)


def test_evolutionary_never_exceeds_its_budget_and_measures_little(setup):
    problem, evaluate = setup
    hi = problem.bytes_at_avg_bits(4.0)
    bounded = dataclasses.replace(problem, max_bytes=hi)
    solver = get_solver("evolutionary", population=8, offspring=4, validate=6)
    ctx = SearchContext(evaluate=evaluate, budget=40, anchors=(problem.bytes_at_avg_bits(3.5), hi), seed=1)
    front = solver.front(bounded, ctx)
    assert front and all(c.bytes <= hi for c in front)
    assert solver.screen_evaluations <= 40 and solver.full_evaluations <= 6 + 2
    anchor = get_solver("dp").solve(bounded)
    anchor_kl = evaluate([anchor], "full")[0]
    full = dict(zip([c.key() for c in front], evaluate(front, "full")))
    assert min(full.values()) <= anchor_kl  # the exact anchor was a candidate, so the front is no worse
    again = get_solver("evolutionary", population=8, offspring=4, validate=6).front(bounded, ctx)
    assert [c.key() for c in again] == [c.key() for c in front]


def test_optuna_study_resumes_from_its_storage(setup, tmp_path):
    problem, evaluate = setup
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = get_solver("optuna", storage=storage, seeds=4, validate=4)
    first.front(problem, SearchContext(evaluate=evaluate, budget=10, seed=0))
    study = first.study(problem, 0)
    assert len(study.trials) == 10
    numbers = [t.number for t in study.trials]
    second = get_solver("optuna", storage=storage, seeds=4, validate=4)
    front = second.front(problem, SearchContext(evaluate=evaluate, budget=16, seed=0))
    trials = second.study(problem, 0).trials
    assert len(trials) == 16 and [t.number for t in trials[:10]] == numbers
    assert trials[10].number == 10 and front


def test_auto_is_exact_without_evaluations_and_refines_with_them(setup):
    problem, evaluate = setup
    exact = get_solver("dp").front(problem)
    assert [c.key() for c in get_solver("auto").front(problem)] == [c.key() for c in exact]
    refined = get_solver("auto", population=6, offspring=3, validate=4).front(
        problem, SearchContext(evaluate=evaluate, budget=12, seed=0))
    assert refined and all(problem.cheapest() <= c.bytes <= problem.dearest() for c in refined)


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
    assert front["solver"]["candidate_evaluations"]["screen"] <= 16
    for point in front["points"]:
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
                                                       "params": {"budgets": 8}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    main(["run", str(path)])
    front = json.loads((out / "front.json").read_text())
    for point in front["points"]:
        config = json.loads((out / point["config"]).read_text())
        bops = sum(l.numel * config["layers"][l.name]["bits"] * 16 for l in layers)
        assert bops <= numel * 4 * 16
