"""Evolutionary multi-objective search (pymoo NSGA-II) on measured quality.

Objectives: whole-model bytes and measured KL(FP ‖ Q) on calibration tokens — never the held-out
tokens the front is reported on. Genes: one level per item (tied groups move together), a level
being the rank of an allowed format by cost, so every gene value is allowed.

- Initial population: the exact solver's proxy configs at the job's budgets (anchors) and spread
  over the byte range, topped up with budget-preserving mutants of them.
- Variation: uniform crossover, then a mutation that keeps bytes exact by switching levels between
  items of equal size (one up, one down, min(randint(1,3), randint(1,3)) switches, as EvoPress), or
  with probability `p_shift` moves one item one level to explore along the bytes axis.
- Fidelity is staged: every candidate is screened on a few calibration tokens; the final population's
  non-dominated configs (and the anchors) are measured on all calibration tokens, and the front is
  taken on those full-fidelity values. The result counts evaluations of both fidelities.
- Every evaluation is cached and counted by (config, fidelity) (`base.Measure`); the evaluation itself is the
  context's evaluator, a plain function of (configs, fidelity), so it can fan out over workers.
"""

from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem as PymooProblem
from pymoo.core.sampling import Sampling
from pymoo.operators.crossover.ux import UniformCrossover
from pymoo.optimize import minimize

from bitalloc.types import BitConfig, Problem, SolveResult

from .base import MeasuringSolver, SearchContext, Stopwatch, register
from .pareto import nondominated


class Genome:
    """Level vectors <-> configs for one problem."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.items = problem.items()
        self.levels = [np.flatnonzero(row)[np.argsort(self.items.cost[i, np.flatnonzero(row)], kind="stable")]
                       for i, row in enumerate(self.items.allowed)]
        self.top = np.array([len(lv) - 1 for lv in self.levels])
        _, self.size_class = np.unique(self.items.cost, axis=0, return_inverse=True)

    def config(self, genes: np.ndarray) -> BitConfig:
        return self.problem.config(self.items.expand([lv[g] for lv, g in zip(self.levels, genes)]))

    def genes(self, config: BitConfig) -> np.ndarray:
        choice = self.items.contract(self.problem.choice(config))
        return np.array([int(np.flatnonzero(lv == f)[0]) for lv, f in zip(self.levels, choice)])

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, p_shift: float) -> np.ndarray:
        x = genes.copy()
        if rng.random() < p_shift:
            i = rng.integers(len(x))
            x[i] = np.clip(x[i] + rng.choice([-1, 1]), 0, self.top[i])
            return x
        for _ in range(min(rng.integers(1, 4), rng.integers(1, 4))):
            up = np.flatnonzero(x < self.top)
            if not len(up):
                break
            i = rng.choice(up)
            down = np.flatnonzero((self.size_class == self.size_class[i]) & (x > 0) & (np.arange(len(x)) != i))
            if not len(down):
                continue
            j = rng.choice(down)
            x[i] += 1
            x[j] -= 1
        return x


@register("evolutionary")
class Evolutionary(MeasuringSolver):
    def __init__(self, population: int = 16, offspring: int = 8, validate: int = 16, p_shift: float = 0.3):
        self.population = population
        self.offspring = offspring
        self.validate = validate
        self.p_shift = p_shift

    def front(self, problem: Problem, ctx: SearchContext | None = None) -> SolveResult:
        watch = Stopwatch()
        measure = self.measure(ctx, self.name, self.population)
        genome = Genome(problem)
        lo, hi = problem.cheapest(), problem.dearest()
        anchors, seeds = self.exact_seeds(problem, ctx, lo, hi, self.population - len(ctx.anchors))
        search = _Search(genome, measure, lo, hi)
        algorithm = NSGA2(
            pop_size=self.population,
            n_offsprings=self.offspring,
            sampling=_Seeded(genome, [genome.genes(c) for c in seeds], self.p_shift),
            crossover=UniformCrossover(),
            mutation=_KeepBytes(genome, self.p_shift),
            eliminate_duplicates=True,
        )
        generations = ctx.termination.generations(self.population, self.offspring)
        result = minimize(search, algorithm, ("n_gen", generations), seed=ctx.seed, verbose=False)
        finals = [genome.config(x) for x in np.atleast_2d(result.pop.get("X")).astype(int)]
        finals = [c for c in finals if measure.known(c, "screen")]
        screened = nondominated(finals, loss=lambda c: measure([c], "screen")[0])
        front = self.validated(anchors, screened, self.validate, lambda configs: measure(configs, "full"))
        return watch.result(self.name, front, evaluations=measure.counts)


class _Search(PymooProblem):
    def __init__(self, genome: Genome, measure, lo: int, hi: int):
        super().__init__(n_var=len(genome.levels), n_obj=2, n_ieq_constr=2, xl=0, xu=genome.top, vtype=int)
        self.genome, self.measure, self.lo, self.hi = genome, measure, lo, hi

    def _evaluate(self, X, out, *args, **kwargs):
        configs = [self.genome.config(x) for x in np.atleast_2d(X).astype(int)]
        feasible = [c for c in configs if self._fits(c)]
        kl = dict(zip([c.key() for c in feasible], self.measure(feasible, "screen")))
        sizes = np.array([c.bytes for c in configs], dtype=float)
        out["F"] = np.column_stack([sizes, [kl.get(c.key(), np.inf) for c in configs]])
        out["G"] = np.column_stack([sizes - self.hi, self.lo - sizes])

    def _fits(self, c: BitConfig) -> bool:
        p = self.genome.problem
        return self.lo <= c.bytes <= self.hi and p.feasible(p.choice(c))


class _Seeded(Sampling):
    def __init__(self, genome: Genome, seeds: list[np.ndarray], p_shift: float):
        super().__init__()
        self.genome, self.seeds, self.p_shift = genome, seeds, p_shift

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        rows = [s for s in self.seeds[:n_samples]]
        while len(rows) < n_samples:
            rows.append(self.genome.mutate(self.seeds[len(rows) % len(self.seeds)], random_state, 0.0))
        return np.array(rows)


class _KeepBytes(Mutation):
    def __init__(self, genome: Genome, p_shift: float):
        super().__init__(prob=1.0)
        self.genome, self.p_shift = genome, p_shift

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        return np.array([self.genome.mutate(x.astype(int), random_state, self.p_shift) for x in X])
