"""A multi-objective Optuna study over per-item format levels: objectives bytes and screened KL.

The study lives in RDB storage (a sqlite file by default) under a name derived from the problem,
so a stopped search started again with the same problem continues from its last finished trial;
`search.evaluations` counts the study's trials in total, not per run. The sampler is NSGA-II, seeded by the
job's seed, and the first trials are the exact solver's configs at the anchors and spread over the
front. Finally the study's Pareto set (and the anchors) are measured at full fidelity, as in the
evolutionary search.
"""

from __future__ import annotations

import hashlib

import numpy as np

from bitalloc.types import Problem, SolveResult

from .base import MeasuringSolver, SearchContext, Stopwatch, register
from .evolutionary import Genome


def problem_key(problem: Problem) -> str:
    h = hashlib.sha256()
    for part in (problem.layers, [f.name for f in problem.formats], problem.groups):
        h.update(repr(part).encode())
    for array in (problem.cost, problem.error, problem.allowed):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


@register("optuna")
class OptunaStudy(MeasuringSolver):
    def __init__(self, storage: str = "sqlite:///bitalloc-optuna.db", study_name: str | None = None,
                 seeds: int = 8, validate: int = 16):
        self.storage = storage
        self.study_name = study_name
        self.seeds = seeds
        self.validate = validate

    def study(self, problem: Problem, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            directions=["minimize", "minimize"],
            storage=self.storage,
            study_name=self.study_name or f"bitalloc-{problem_key(problem)}",
            load_if_exists=True,
            sampler=optuna.samplers.NSGAIISampler(seed=seed),
        )

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> SolveResult:
        import optuna

        watch = Stopwatch()
        measure = self.measure(ctx, self.name, 1)
        genome = Genome(problem)
        anchors, seeds = self.exact_seeds(problem, ctx, problem.cheapest(), problem.dearest(), self.seeds)
        study = self.study(problem, ctx.seed)
        if not study.trials:
            for config in seeds:
                study.enqueue_trial({f"l{i}": int(g) for i, g in enumerate(genome.genes(config))})

        def objective(trial):
            genes = np.array([trial.suggest_int(f"l{i}", 0, int(top)) for i, top in enumerate(genome.top)])
            config = genome.config(genes)
            if not problem.feasible(problem.choice(config)):
                raise optuna.TrialPruned()
            return config.bytes, measure([config], "screen")[0]

        todo = ctx.termination.remaining(sum(t.state.is_finished() for t in study.trials))
        if todo:
            study.optimize(objective, n_trials=todo)
        best = [genome.config(np.array([t.params[f"l{i}"] for i in range(len(genome.top))])) for t in study.best_trials]
        pareto = sorted({c.key(): c for c in best}.values(), key=lambda c: c.bytes)

        front = self.validated(anchors, pareto, self.validate, lambda configs: measure(configs, "full"))
        return watch.result(self.name, front, evaluations=measure.counts)
