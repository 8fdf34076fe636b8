"""The search, stage by stage, as plain functions over typed objects:

    Workspace.open (load -> select layers -> tokens -> level store) -> sensitivity (file-cached table)
    -> build_problem -> resolve_budgets -> solve_front (SolveResult) -> candidates -> measure -> results
    (Front + ConfigDocs) -> write_results

Nothing here reads a job spec or talks to the terminal beyond `Stages`: the job runner (`bitalloc.jobs.runner`),
`bitalloc sensitivity`, estimator scoring and the benchmarks all call these same stages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch

from . import configio
from .data import TokenSets, make_token_sets, text_files, tokenize_files
from .errors import BitallocError
from .evaluate import reference_bytes
from .experts import expert_ties
from .formats import Format, substitute
from .metrics import METRICS
from .model import (HIDDEN_STATE, LoadedModel, QuantizableLayer, check_context, coverage, list_layers, load_model,
                    other_bytes, select_layers, uncovered)
from .progress import Stages
from .quantizers import Calibration, Quantizer
from .quantizers.inputs import MIN_ROUTED
from .quantizers.store import Levels, dense_bytes, open_stores
from .results import (ConfigDoc, DataInfo, Evaluations, Front, JobInfo, MetricDoc, ModelInfo, Point, ProxyFront,
                      Reference, SensitivityInfo, SolverInfo, MemoryInfo)
from .search import SearchContext, best_within, spread
from .search.base import Evaluate, Solver, check_budget
from .search.constraints import Constraints, allowed_mask, tie_groups
from .sensitivity import EstimatorContext
from .sensitivity import cache as table_cache
from .sensitivity.base import Estimator, run_estimator
from .tasks import Backend, EvalTask, LocalRunner
from .types import BitConfig, FileBytes, Measurement, Problem, SensitivityTable, SolveResult
from .units import mib, parse_bytes


@dataclass
class Workspace:
    """What every stage after loading needs, built once: the model, its chosen layers, the formats, the token
    sets and every (layer, format)'s level (in the level store, read on demand)."""

    source: str
    model: LoadedModel
    layers: list[QuantizableLayer]
    formats: tuple[Format, ...]
    model_hash: str
    data: TokenSets
    levels: Levels
    batch_size: int = 2
    reference: str = "float32"

    @classmethod
    def open(cls, source: str, formats: tuple[Format, ...], *, include: list[str] = (), exclude: list[str] = (),
             embeddings: bool = True, embeddings_why: str = "", allow_partial: bool = False,
             trust_remote_code: bool = False, text: str | list[str] = "shakespeare",
             seq_len: int = 512, calibration: int = 8, evaluation: int = 4, batch_size: int = 2, seed: int = 0,
             reference: str = "float32", quantizers: dict[str, Quantizer] | None = None,
             stages: Stages | None = None,
             before_quantize: Callable[[LoadedModel, list[QuantizableLayer]], None] | None = None) -> "Workspace":
        """Load and select layers (the token embedding only with `embeddings`; `embeddings_why` says why not, printed
        when the model has one), call `before_quantize` (a caller's checks: budgets, the memory plan), tokenize,
        and fill the level store (levels a previous job made for the same model and quantizer are reused). The
        working set holds one candidate's dense weights."""
        stages = stages or Stages()
        torch.manual_seed(seed)
        files = text_files(text)
        with stages.stage("load model"):
            model = load_model(source, trust_remote_code=trust_remote_code)
            check_context(model, seq_len)
            if reference != "float32" and model.metric == HIDDEN_STATE:
                raise BitallocError("data.reference", f"{reference} applies to next-token models; {source!r} is "
                                                      f"measured on hidden states, whose reference is small: float32")
            listed = list_layers(model)
            check_coverage(model, listed, allow_partial)
            layers = select_layers(listed, list(include), list(exclude), embeddings)
            kept = [l for l in listed if l.embedding and l not in layers]
            if kept and embeddings_why:
                stages.print(f"{kept[0].name} stays {kept[0].dtype}: {embeddings_why}")
            if before_quantize:
                before_quantize(model, layers)
            searched, total = coverage(model, layers)
            experts = sum(1 for l in layers if l.experts)
            table = next((l for l in layers if l.embedding), None)
            also = f", and the token embedding ({table.numel:,}{', tied to the head' if table.head else ''})" \
                if table else ""
            stages.print(f"searching {len(layers)} layers{f' ({experts} of them expert units)' if experts else ''}: "
                         f"{searched:,} parameters, {100 * searched / max(total, 1):.1f} % of the model's "
                         f"non-embedding parameters{also}")
            model_hash = model.content_hash()
        with stages.stage("tokenize text", len(files)):
            data = make_token_sets(tokenize_files(files, model.tokenizer), seq_len, calibration, evaluation, seed)
        stores = open_stores(model_hash, formats, quantizers, Calibration(data.calibration, data.data_hash))
        for method, store in stores.items():
            count = sum(f.method == method for f in formats)
            steps = count if method == "gguf" else len(layers)
            with stages.stage(f"quantize ({method}) {len(layers)} layers x {count} formats", steps) as advance:
                made, reused = store.fill(model, layers, formats, progress=advance)
            if reused:
                stages.print(f"levels ({method}): {reused} reused, {made} made, {store.folder}")
            few, experts = getattr(store.quantizer, "data_free", (0, 0))
            if few:
                stages.print(f"levels ({method}): {few} of {experts} expert matrices saw fewer than {MIN_ROUTED} "
                             f"routed calibration tokens and were quantized without their inputs (more "
                             f"data.calibration sequences route more tokens to every expert)")
        levels = Levels(model, layers, formats, stores, working_set=dense_bytes(model, layers))
        return cls(source, model, layers, formats, model_hash, data, levels, batch_size, reference)

    def token_sets(self) -> dict[str, torch.Tensor]:
        return {"calibration": self.data.calibration, "evaluation": self.data.evaluation}

    def local_runner(self) -> LocalRunner:
        return LocalRunner(self.model, self.levels, self.token_sets(), self.batch_size, self.reference)


def check_coverage(model: LoadedModel, layers: list[QuantizableLayer], allow_partial: bool) -> None:
    """Refuse a model of which bitalloc could search less than half the non-embedding parameters (a front over a
    small part of a model says little of its file), naming the largest weights it cannot quantize."""
    searched, total = coverage(model, layers)
    if allow_partial or not total or searched * 2 >= total:
        return
    largest = [u for u in uncovered(model, layers) if "embedding" not in u.why][:3]
    names = ", ".join(f"{u.name} ({u.numel:,} params: {u.why})" for u in largest)
    raise BitallocError("model.source", f"bitalloc can search only {100 * searched / total:.1f} % of "
                                        f"{model.source!r}'s non-embedding parameters; the largest it cannot: {names}; "
                                        f"set model.allow_partial: true to search the rest anyway")


class TableResult(NamedTuple):
    table: SensitivityTable
    path: Path
    cache_hit: bool


def sensitivity(ws: Workspace, estimator: Estimator, seed: int, stages: Stages | None = None,
                backend: Backend | None = None, evaluator: str = "torch") -> TableResult:
    """The estimator's table from the file cache (keyed by its version and declared parameters, and by the
    `evaluator` whose arithmetic `backend` measures), or computed and stored."""
    stages = stages or Stages()
    key = table_cache.table_key(estimator, ws.model_hash, ws.formats, ws.layers, ws.data.data_hash, seed,
                                {m: store.key for m, store in ws.levels.stores.items()}, evaluator)
    path = table_cache.path_for(key, estimator.name)
    cached = table_cache.load(path)
    if cached is not None:
        stages.print(f"sensitivity ({estimator.name}): cache hit, {path}")
        return TableResult(cached, path, True)
    ctx = EstimatorContext(ws.model, ws.layers, ws.formats, ws.levels, ws.data.calibration, ws.data.data_hash, seed,
                           backend or ws.local_runner())
    with stages.stage(f"sensitivity ({estimator.name})", estimator.steps(ctx)) as advance:
        ctx.progress = advance
        table = run_estimator(estimator, ctx)
    table_cache.save(table, path)
    return TableResult(table, path, False)


def build_problem(model: LoadedModel, layers: list[QuantizableLayer], formats: tuple[Format, ...],
                  table: SensitivityTable | None = None, constraints: Constraints = Constraints(),
                  ties: list[tuple[int, ...]] = (), file: FileBytes | None = None) -> Problem:
    """The byte-exact cost model of the chosen layers (a format that does not fit a layer is not allowed there, and
    costs what stands in for it in a uniform config) — as bitalloc counts them, or as the runtime's `file` stores
    them —, the table's errors when given, the constraints' pins, ties, min/max bits and resource limits, `ties` a
    runtime target imposes and per-expert Linear experts' (one format per block and projection, as runtimes store
    them), merged with the constraints'."""
    stand_in = np.array([[_substitute_index(f, l, formats) for f in formats] for l in layers],
                        dtype=np.int64).reshape(len(layers), len(formats))
    stored = file.stored if file is not None else int
    cost = np.array([[stored(l.bytes_at(formats[k])) for k in row]
                     for l, row in zip(layers, stand_in)], dtype=np.int64)
    fits = stand_in == np.arange(len(formats))  # a format stands in for itself exactly where it fits
    return Problem(
        layers=tuple(l.name for l in layers),
        formats=formats,
        numel=np.array([l.numel for l in layers], dtype=np.int64),
        cost=cost,
        error=table.values if table is not None else np.zeros(cost.shape),
        allowed=allowed_mask(layers, formats, constraints.pin, constraints.min_bits, constraints.max_bits) & fits,
        fixed_bytes=file.fixed if file is not None else other_bytes(model, layers),
        groups=_merged(list(tie_groups(layers, constraints.tie)) + list(ties) + expert_ties([l.name for l in layers])),
        limits=constraints.limits(layers, formats),
        substitute=None if fits.all() else stand_in,
        file=file,
    )


def _merged(groups: list[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    """Overlapping groups joined into one."""
    out: list[set[int]] = []
    for g in groups:
        joined = set(g)
        for other in [o for o in out if o & joined]:
            joined |= other
            out.remove(other)
        out.append(joined)
    return tuple(tuple(sorted(g)) for g in out if len(g) > 1)


def _substitute_index(fmt: Format, layer: QuantizableLayer, formats: tuple[Format, ...]) -> int:
    stand_in = substitute(fmt, layer.in_features, formats)
    if stand_in is None:
        raise BitallocError("formats", f"no job format fits {layer.name} (rows of {layer.in_features}); add one "
                                       f"whose blocks or groups divide {layer.in_features}, or exclude the layer")
    return formats.index(stand_in)


class Budget(NamedTuple):
    label: str
    bytes: int


def resolve_budgets(problem: Problem, budgets: list, field: str = "search.budgets", sizes: bool = True
                    ) -> list[Budget]:
    """Each budget as whole-model bytes: a number is average bits, a string with a unit is bytes. Each is checked
    feasible, a size only with `sizes` (a size is a runtime file's bytes, checked once that file's are known)."""
    out = []
    for i, b in enumerate(budgets):
        where = f"{field}[{i}]"
        size = isinstance(b, str) and not b.strip().replace(".", "", 1).isdigit()
        if size:
            budget = Budget(b, parse_bytes(b, where))
        else:
            budget = Budget(f"{float(b):g} bits", problem.bytes_at_avg_bits(float(b)))
        if sizes or not size:
            check_budget(problem, budget.bytes, where)
        out.append(budget)
    return out


def solve_front(solver: Solver, problem: Problem, budgets: list[Budget], seed: int = 0,
                evaluator: Evaluate | None = None, evaluations: int = 0, stages: Stages | None = None) -> SolveResult:
    """The solver's whole front, including its best config at every budget."""
    stages = stages or Stages()
    ctx = SearchContext(anchors=tuple(b.bytes for b in budgets), seed=seed, evaluator=evaluator,
                        evaluations=evaluations)
    with stages.stage(f"solve front ({solver.name})"):
        return solver.front(problem, ctx)


@dataclass(frozen=True)
class Candidate:
    """A config chosen for measurement: a mixed front point or a uniform baseline."""

    kind: Literal["mixed", "uniform"]
    label: str
    config: BitConfig
    format: str | None = None


def candidates(front: SolveResult, problem: Problem, budgets: list[Budget], points: int) -> list[Candidate]:
    """The front's best config within each budget, `points` more spread evenly in bytes, then every format as a
    uniform baseline."""
    chosen: dict[tuple, Candidate] = {}
    for budget in budgets:
        config = best_within(front.configs, budget.bytes)
        if config is None:
            raise BitallocError("search.budgets", f"the {front.solver} front has no config within {budget.label}")
        chosen.setdefault(config.key(), Candidate("mixed", f"mixed @ {budget.label}", config))
    for k, config in enumerate(spread(front.configs, points)):
        chosen.setdefault(config.key(), Candidate("mixed", f"mixed #{k + 1}", config))
    uniform = [Candidate("uniform", f"uniform {f.name}", problem.uniform(j), f.name)
               for j, f in enumerate(problem.formats)]
    return list(chosen.values()) + uniform


@dataclass(frozen=True)
class MeasuredPoints:
    """The FP model's measurement on the held-out tokens, and each candidate's."""

    reference: Measurement
    points: list[tuple[Candidate, Measurement]]


def measure(backend: Backend, chosen: list[Candidate], stages: Stages | None = None) -> MeasuredPoints:
    stages = stages or Stages()
    with stages.stage("measure configs", len(chosen) + 1) as advance:
        tasks = [EvalTask("evaluation")] + [EvalTask.config(c.config.assignment(), "evaluation") for c in chosen]
        reference, *results = backend.map(tasks, advance)
    return MeasuredPoints(reference, list(zip(chosen, results)))


@dataclass
class Results:
    """What a job writes: the front, one config document per measured point (by path in the result folder) and
    the sensitivity table."""

    front: Front
    configs: dict[str, ConfigDoc]
    table: SensitivityTable


def config_meta(ws: Workspace, spec_hash: str, other_bytes: int) -> dict:
    """What every config document of the job holds beside its formats and figures (`ConfigDoc.of`'s keywords)."""
    return dict(model_source=ws.source, model_hash=ws.model_hash, spec_hash=spec_hash,
                model_type=ws.model.model_type, shapes={l.name: list(l.shape) for l in ws.layers},
                embeddings=[l.name for l in ws.layers if l.embedding], metric=METRICS[ws.model.metric],
                other_bytes=other_bytes, quantizers={m: s.quantizer.params() for m, s in ws.levels.stores.items()})


def results(ws: Workspace, job: JobInfo, table: TableResult, problem: Problem, solved: SolveResult,
            measured: MeasuredPoints) -> Results:
    """The typed results of a measured search; mixed points numbered by size (a spread point's label is its
    number)."""
    model, layers = ws.model, ws.layers
    meta = config_meta(ws, job.spec_hash, problem.fixed_bytes)
    pairs, reference = measured.points, measured.reference
    mixed = sorted(((c, m) for c, m in pairs if c.kind == "mixed"), key=lambda cm: cm[0].config.bytes)
    configs, points = {}, []
    for i, (c, m) in enumerate(mixed + [(c, m) for c, m in pairs if c.kind == "uniform"]):
        path = (f"configs/mixed-{i + 1:02d}-{c.config.avg_bits:.3f}b.json" if c.kind == "mixed"
                else f"configs/uniform-{c.format}.json")
        configs[path] = ConfigDoc.of(c.config, m, **meta)
        # a spread point is named by its number among the mixed points by size: what `--point N` picks
        label = f"mixed #{i + 1}" if c.kind == "mixed" and c.label.startswith("mixed #") else c.label
        points.append(Point(kind=c.kind, label=label, format=c.format, avg_bits=round(c.config.avg_bits, 6),
                            bytes=c.config.bytes, mib=round(mib(c.config.bytes), 6), predicted=c.config.predicted,
                            loss=m.loss, quality=m.quality, loss_error=m.loss_error or None, config=path))
    stored = problem.file.stored if problem.file is not None else int
    fp_bytes = problem.fixed_bytes + sum(stored(l.numel * model.parameter(l).element_size()) for l in layers)
    t = table.table
    front = Front(
        job=job,
        model=ModelInfo(source=ws.source, type=model.model_type, content_hash=ws.model_hash,
                        quantized_layers=len(layers), quantized_params=int(problem.numel.sum()),
                        other_bytes=problem.fixed_bytes,
                        bytes_of=problem.file.runtime if problem.file is not None else None),
        data=DataInfo(hash=ws.data.data_hash, calibration_tokens=ws.data.calibration.numel(),
                      evaluation_tokens=ws.data.evaluation.numel()),
        sensitivity=SensitivityInfo(estimator=t.estimator, version=t.version, params=t.params,
                                    wall_time_s=t.wall_time_s, peak_rss_bytes=t.peak_rss_bytes,
                                    cache_file=str(table.path)),
        solver=SolverInfo(name=solved.solver, bound=solved.bound, slack_bytes=solved.slack_bytes,
                          front_size=len(solved.configs), evaluations=Evaluations(**solved.evaluations),
                          wall_time_s=solved.wall_time_s),
        metric=MetricDoc.of(meta["metric"]),
        reference=Reference(bytes=fp_bytes, mib=round(mib(fp_bytes), 6), quality=reference.quality,
                            tokens=reference.tokens, precision=ws.reference),
        points=points,
        proxy_front=ProxyFront(bytes=[c.bytes for c in solved.configs], predicted=[c.predicted for c in solved.configs]),
        memory=MemoryInfo(level_store_bytes=ws.levels.nbytes, working_set_bytes=ws.levels.working_set,
                          reference_bytes=reference_bytes(model, ws.data.evaluation.numel(),
                                                                      ws.reference)),
    )
    return Results(front, configs, t)


def write_results(res: Results, folder: Path) -> None:
    """front.json, configs/ and sensitivity.json into FOLDER; the front carries the digest of itself and of every
    config file (`Front.digest`), which readers check."""
    digest = {}
    for path, doc in res.configs.items():
        configio.write(doc.document(), folder / path)
        digest[path] = hashlib.sha256((folder / path).read_bytes()).hexdigest()
    configio.write(table_cache.table_document(res.table), folder / "sensitivity.json")
    res.front = res.front.model_copy(update={"digest": {"front": res.front.content_sha256(), **digest}})
    configio.write(res.front.document(), folder / "front.json")


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, recorded with it."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("bitalloc", "torch", "transformers", "numpy", "ortools", "pymoo", "optuna", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
