"""Run a job locally: model -> sensitivity table -> problem -> solver front -> measured points -> files.

Results are written to a staging folder beside the output dir and moved into place only when the
whole job has succeeded, so an interrupted or failed job never leaves files that look like results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bitalloc import __version__
from bitalloc import configio, memory_plan
from bitalloc.dashboards.plots import write_plots
from bitalloc.dashboards.tracking import Tracker, resolve_uri
from bitalloc.data import TokenSets, make_token_sets, text_files, tokenize_files
from bitalloc.errors import BitallocError
from bitalloc.evaluate import QuantCache
from bitalloc.metrics import METRICS, Metric
from bitalloc.tasks import Backend, CandidateEvaluator, Checkpointed, EvalTask, LocalRunner
from bitalloc.formats import Format, weight_bytes
from bitalloc.model import (LoadedModel, QuantizableLayer, check_context, list_layers, load_model, other_bytes,
                            select_layers)
from bitalloc.search import SearchContext, best_within, constraints, get_solver, spread
from bitalloc.search.base import check_budget
from bitalloc.sensitivity import EstimatorContext, get_estimator
from bitalloc.sensitivity import cache as table_cache
from bitalloc.sensitivity.base import Estimator, run_estimator
from bitalloc.types import BitConfig, Measurement, Problem, SensitivityTable
from bitalloc.units import mib, parse_bytes

from .spec import JobSpec, SearchSpec


class Stages:
    """Rich progress on stderr for every long stage, and the wall time of each."""

    def __init__(self, console: Console):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        )
        self.timings: dict[str, float] = {}

    def __enter__(self) -> "Stages":
        self.progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        quiet = self.progress.console.quiet
        if exc_type is not None:
            self.progress.console.quiet = True
        self.progress.stop()
        self.progress.console.quiet = quiet

    @contextmanager
    def stage(self, name: str, total: int | None = None):
        task = self.progress.add_task(name, total=total)
        start = time.perf_counter()
        yield lambda n=1: self.progress.advance(task, n)
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.progress.update(task, completed=total if total is not None else 1, total=total or 1)


def build_problem(model: LoadedModel, layers: list[QuantizableLayer], formats: tuple[Format, ...],
                  table: SensitivityTable | None = None, search: SearchSpec | None = None) -> Problem:
    """The byte-exact cost model of the chosen layers, the table's errors when given, and the
    search section's pins, ties, min/max bits and BOPs / latency limits."""
    search = search or SearchSpec()
    cost = np.array([[weight_bytes(l.out_features, l.in_features, f) for f in formats] for l in layers], dtype=np.int64)
    return Problem(
        layers=tuple(l.name for l in layers),
        formats=formats,
        numel=np.array([l.numel for l in layers], dtype=np.int64),
        cost=cost,
        error=table.values if table is not None else np.zeros(cost.shape),
        allowed=constraints.allowed_mask(layers, formats, search.pin, search.min_bits, search.max_bits),
        fixed_bytes=other_bytes(model, layers),
        groups=constraints.tie_groups(layers, search.tie),
        bops=constraints.bops_table(layers, formats) if search.max_bops else None,
        max_bops=int(search.max_bops) if search.max_bops else None,
        latency=constraints.latency_table(search.latency_table, layers, formats) if search.latency_table else None,
        max_latency=search.max_latency,
    )


def resolve_budgets(problem: Problem, budgets: list) -> list[tuple[str, int]]:
    """Each budget as (label, whole-model bytes); a number is average bits, a string with a unit is bytes."""
    out = []
    for i, b in enumerate(budgets):
        field = f"search.budgets[{i}]"
        if isinstance(b, str) and not b.strip().replace(".", "", 1).isdigit():
            label, n_bytes = b, parse_bytes(b, field)
        else:
            label, n_bytes = f"{float(b):g} bits", problem.bytes_at_avg_bits(float(b))
        check_budget(problem, n_bytes, field)
        out.append((label, n_bytes))
    return out


@dataclass
class _Point:
    label: str
    config: BitConfig
    measurement: Measurement | None = None


def _row(point: _Point, config_path: str, metric: Metric) -> dict:
    c, m = point.config, point.measurement
    return {
        "label": point.label,
        "avg_bits": round(c.avg_bits, 6),
        "bytes": c.bytes,
        "mib": round(mib(c.bytes), 6),
        "predicted": c.predicted,
        metric.loss: m.loss,
        metric.quality: m.quality,
        "config": config_path,
    }


@dataclass
class Workspace:
    """What every command that works on a job's model needs, built once: model, layers, data, quantized weights."""

    spec: JobSpec
    model: LoadedModel
    layers: list[QuantizableLayer]
    formats: tuple[Format, ...]
    model_hash: str
    data: TokenSets
    cache: QuantCache

    @classmethod
    def open(cls, spec: JobSpec, stages: Stages, check: Callable[[Problem], None] = lambda p: None,
             plan: Callable[[LoadedModel, list[QuantizableLayer]], None] = lambda m, l: None) -> "Workspace":
        """Load, select layers, run `check` on the cost model (budgets fail fast) and `plan` on the model (memory),
        tokenize, quantize."""
        torch.manual_seed(spec.seed)
        formats = spec.formats.expand()
        files = text_files(spec.data.source)
        with stages.stage("load model"):
            model = load_model(spec.model.source, trust_remote_code=spec.model.trust_remote_code)
            check_context(model, spec.data.seq_len)
            layers = select_layers(list_layers(model), spec.model.include, spec.model.exclude, spec.model.quantize_tied)
            check(build_problem(model, layers, formats, search=spec.search))
            plan(model, layers)
            model_hash = model.content_hash()
        with stages.stage("tokenize text", len(files)):
            tokens = tokenize_files(files, model.tokenizer)
            data = make_token_sets(tokens, spec.data.seq_len, spec.data.calibration, spec.data.evaluation, spec.seed)
        with stages.stage(f"quantize {len(layers)} layers x {len(formats)} formats", len(layers)) as advance:
            cache = QuantCache(model, layers, formats, progress=advance)
        return cls(spec, model, layers, formats, model_hash, data, cache)

    def local_runner(self) -> LocalRunner:
        return LocalRunner(self.model, self.cache, {"calibration": self.data.calibration,
                                                    "evaluation": self.data.evaluation}, self.spec.data.batch_size)

    def sensitivity(self, estimator: Estimator, stages: Stages, backend: Backend | None = None
                    ) -> tuple[SensitivityTable, Path, bool]:
        """The estimator's table from the file cache, or computed and stored; returns (table, path, cache hit)."""
        key = table_cache.table_key(estimator, self.model_hash, self.formats, self.layers, self.data.data_hash,
                                    self.spec.seed)
        path = table_cache.path_for(key, estimator.name)
        cached = table_cache.load(path)
        if cached is not None:
            stages.progress.console.print(f"sensitivity ({estimator.name}): cache hit, {path}")
            return cached, path, True
        ctx = EstimatorContext(self.model, self.layers, self.formats, self.cache, self.data.calibration,
                               self.data.data_hash, self.spec.seed, backend or self.local_runner())
        with stages.stage(f"sensitivity ({estimator.name})", estimator.steps(ctx)) as advance:
            ctx.progress = advance
            table = run_estimator(estimator, ctx)
        table_cache.save(table, path)
        return table, path, False


def staging_dir(out: Path) -> Path:
    """Where a job keeps its spec and checkpoint while it runs; it becomes OUT when the job succeeds."""
    return out.parent / f".{out.name}.partial"


def resume_spec(out: Path) -> JobSpec:
    """The spec of the interrupted job whose output dir is OUT."""
    saved = staging_dir(out) / "spec.yaml"
    if not saved.is_file():
        raise BitallocError("--resume", f"no interrupted job writes to {str(out)!r} (no {saved})")
    from .spec import load_spec

    return load_spec(saved)


@contextmanager
def evaluation_place(spec: JobSpec, log: Path | None):
    """Where evaluations will run, entered before the model loads (an unreachable cluster or missing GPUs
    refuse at once): yields (where, workers), or (None, 0) for this process. Ray's own log lines go to `log`."""
    run, workers = spec.run, spec.run.worker_count()
    if workers == 0:
        yield None, 0
        return
    from .cluster import ray_session

    with ray_session(run.address, workers * run.threads_per_worker, workers * run.gpus_per_worker, log) as where:
        yield where, workers


@contextmanager
def open_backend(ws: Workspace, where: str | None, workers: int):
    """The job's evaluation backend: in this process, or Ray workers in the session `evaluation_place` opened."""
    if where is None:
        yield ws.local_runner(), "this process"
        return
    from .workers import RayRunner

    run = ws.spec.run
    runner = RayRunner(ws.model.module, ws.layers, ws.formats, ws.cache.store,
                       {"calibration": ws.data.calibration, "evaluation": ws.data.evaluation},
                       ws.spec.data.batch_size, workers, run.threads_per_worker, run.gpus_per_worker, ws.model.metric)
    try:
        yield runner, f"{workers} Ray workers on {where}"
    finally:
        runner.close()


def preflight(spec: JobSpec, estimator: Estimator) -> None:
    """The checks that need only the spec, before anything is written (the cluster address and GPUs are checked
    by `evaluation_place`, which is entered before the model loads)."""
    if spec.search.evaluations and spec.data.calibration == 0:
        raise BitallocError("search.evaluations", "measuring candidates needs data.calibration of 1 or more")
    if estimator.uses_data and spec.data.calibration == 0:
        raise BitallocError("data.calibration", f"the {estimator.name} estimator needs calibration sequences; "
                                                f"set it to 1 or more, or use sensitivity.estimator: sqnr")
    text_files(spec.data.source)


def _memory_check(spec: JobSpec, estimator: Estimator, console: Console):
    """The memory plan as Workspace.open's `plan` hook: printed, and a job that cannot fit refused."""
    def check(model: LoadedModel, layers: list[QuantizableLayer]) -> None:
        limit = spec.run.memory_limit
        available = parse_bytes(limit, "run.memory_limit") if limit else memory_plan.available_bytes()
        plan = memory_plan.plan(model, layers, len(spec.formats.expand()), spec, estimator,
                                spec.run.worker_count(), available)
        console.print(plan.summary(), soft_wrap=True)
        plan.check()

    return check


@contextmanager
def output_lock(out: Path):
    """Hold OUT for this job: a second job writing the same output dir refuses at once instead of sharing its
    staging folder."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise BitallocError("--out", f"another job is writing {str(out)!r}; wait for it to end or choose "
                                         f"another output dir") from None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                break  # still the lock file (not one a finishing job just removed)
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fh.close()


def interrupted_hint(out: Path) -> str:
    """What to tell a user who stopped the job writing OUT."""
    if (staging_dir(out) / "spec.yaml").is_file():
        return f"resume with `bitalloc run --resume {out}`"
    return "nothing was written"


def run_job(spec: JobSpec, out: Path | None = None, console: Console | None = None, resume: bool = False,
            verbose: bool = False) -> dict:
    """Run the whole job and return the front document (also written to OUT/front.json).

    Measurements are checkpointed in OUT's staging dir as they arrive; with `resume`, a job whose
    driver died continues from there and re-runs only what had not finished. The job is tracked as
    an MLflow run (a resumed job reopens its run); plots go to OUT/plots; Ray's own log lines go to
    OUT/job.log unless `verbose`. A job that fails on bad input leaves nothing behind; one that is
    interrupted keeps its staging dir for --resume."""
    console = console or Console(stderr=True)
    out = Path(out) if out is not None else spec.output_dir()
    check_output(out, "--out")
    estimator = get_estimator(spec.sensitivity.estimator, **spec.sensitivity.params)
    solver = get_solver(spec.search.solver, **spec.search.params)
    preflight(spec, estimator)
    with output_lock(out):
        staging = staging_dir(out)
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "spec.yaml").write_text(configio.dumps(spec.model_dump(mode="json"), ".yaml"))
        try:
            document = _run(spec, out, staging, estimator, solver, console, None if verbose else staging / "job.log")
        except BitallocError:
            if not resume and not (staging / "checkpoint.jsonl").is_file():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _publish(staging, out)
    return document


def _run(spec: JobSpec, out: Path, staging: Path, estimator: Estimator, solver, console: Console,
         log: Path | None) -> dict:
    budgets: list[tuple[str, int]] = []
    tracker = None
    with Stages(console) as stages, evaluation_place(spec, log) as (place, workers):
        try:
            ws = Workspace.open(spec, stages, check=lambda p: budgets.extend(resolve_budgets(p, spec.search.budgets)),
                                plan=_memory_check(spec, estimator, console))
            with open_backend(ws, place, workers) as (runner, where):
                console.print(f"evaluations run in {where}")
                tracker = _start_tracking(ws, out, staging, console)
                backend = Checkpointed(runner, staging / "checkpoint.jsonl")
                document = _search_and_measure(ws, estimator, solver, budgets, backend, stages, staging)
            document["timings_s"] = stages.timings
            document["evaluations"] = {"computed": backend.computed, "from_checkpoint": backend.reused, "where": where}
            document["tracking"] = tracker.info() if tracker else {}
            configio.write(document, staging / "front.json")
            with stages.stage("plots"):
                write_plots(staging)
        except BaseException:
            if tracker:
                tracker.fail()
            raise
    (staging / "checkpoint.jsonl").unlink()
    (staging / TRACKING_FILE).unlink(missing_ok=True)
    if tracker:
        tracker.finish(document, staging)
    return document


TRACKING_FILE = "tracking.json"


def _start_tracking(ws: Workspace, out: Path, staging: Path, console: Console) -> Tracker | None:
    """Open the job's MLflow run (or reopen the one an interrupted job left in its staging dir)."""
    spec = ws.spec
    if not spec.tracking.enabled:
        return None
    saved = staging / TRACKING_FILE
    previous = json.loads(saved.read_text()) if saved.is_file() else {}
    tracker = Tracker(resolve_uri(spec.tracking.uri), console)
    tags = {"bitalloc.spec_hash": spec.spec_hash(), "bitalloc.seed": str(spec.seed),
            "bitalloc.model_hash": ws.model_hash, "bitalloc.output": str(out.resolve()),
            **{f"package.{k}": v for k, v in package_versions().items()}}
    run_id = tracker.start(spec.tracking.experiment or spec.name, spec.name, spec.model_dump(mode="json"), tags,
                           run_id=previous.get("run_id") if previous.get("uri") == tracker.uri else None)
    if run_id is not None:
        saved.write_text(json.dumps(tracker.info()))
        console.print(f"tracking: MLflow run {run_id} in {tracker.uri}")
    return tracker


def _search_and_measure(ws: Workspace, estimator: Estimator, solver, budgets: list[tuple[str, int]],
                        backend: Backend, stages: Stages, staging: Path) -> dict:
    """Sensitivity, the front, the measured points; writes configs and the table into the staging dir."""
    spec, model, layers, formats, data = ws.spec, ws.model, ws.layers, ws.formats, ws.data
    table, table_path, _ = ws.sensitivity(estimator, stages, backend)
    problem = build_problem(model, layers, formats, table, spec.search)
    candidates = None
    if spec.search.evaluations:
        candidates = CandidateEvaluator(backend, spec.search.screen_tokens)
    ctx = SearchContext(evaluate=candidates, budget=spec.search.evaluations,
                        anchors=tuple(b for _, b in budgets), seed=spec.seed)
    with stages.stage(f"solve front ({solver.name})"):
        front = solver.front(problem, ctx)
    points: dict[tuple, _Point] = {}
    for label, n_bytes in budgets:
        config = best_within(front, n_bytes)
        if config is None:
            raise BitallocError("search.budgets", f"the {solver.name} front has no config within {label}")
        points.setdefault(config.key(), _Point(f"mixed @ {label}", config))
    for k, config in enumerate(spread(front, spec.search.points)):
        points.setdefault(config.key(), _Point(f"mixed #{k + 1}", config))
    unconstrained = dataclasses.replace(problem, allowed=np.ones_like(problem.allowed), groups=())
    uniform = [_Point(f.name, unconstrained.config(np.full(len(layers), j))) for j, f in enumerate(formats)]
    todo = list(points.values()) + uniform
    with stages.stage("measure configs", len(todo) + 1) as advance:
        tasks = [EvalTask("evaluation")] + [EvalTask.config(p.config.assignment(), "evaluation") for p in todo]
        reference, *results = backend.map(tasks, advance)
    for point, measurement in zip(todo, results):
        point.measurement = measurement
    return _write_results(ws, table, table_path, solver, front, points, uniform, reference, candidates, problem,
                          staging)


def _write_results(ws: Workspace, table, table_path, solver, front, points, uniform, reference, candidates,
                   problem: Problem, staging: Path) -> dict:
    """Config files and the table into the staging dir; returns the front document."""
    spec, model, layers, data = ws.spec, ws.model, ws.layers, ws.data
    fp_bytes = problem.fixed_bytes + sum(l.numel * model.layer_module(l.name).weight.element_size() for l in layers)
    metric = METRICS[model.metric]
    doc_meta = dict(model_source=spec.model.source, model_hash=ws.model_hash, spec_hash=spec.spec_hash(),
                    model_type=model.model_type, shapes={l.name: [l.out_features, l.in_features] for l in layers},
                    metric=metric, other_bytes=problem.fixed_bytes)
    rows, uniform_rows = [], []
    for i, point in enumerate(sorted(points.values(), key=lambda p: p.config.bytes)):
        rel = f"configs/mixed-{i + 1:02d}-{point.config.avg_bits:.3f}b.json"
        configio.write(configio.config_document(point.config, measurement=point.measurement, **doc_meta), staging / rel)
        rows.append(_row(point, rel, metric))
    for point in uniform:
        rel = f"configs/uniform-{point.label}.json"
        configio.write(configio.config_document(point.config, measurement=point.measurement, **doc_meta), staging / rel)
        row = _row(point, rel, metric)
        row["format"] = row.pop("label")
        uniform_rows.append(row)
    configio.write(table_cache.table_document(table), staging / "sensitivity.json")
    return {
        "schema": configio.FRONT_SCHEMA,
        "bitalloc_version": __version__,
        "job": {"name": spec.name, "seed": spec.seed, "spec_hash": spec.spec_hash(), "packages": package_versions()},
        "model": {
            "source": spec.model.source,
            "type": model.model_type,
            "content_hash": ws.model_hash,
            "quantized_layers": len(layers),
            "quantized_params": int(problem.numel.sum()),
            "other_bytes": problem.fixed_bytes,
        },
        "data": {"hash": data.data_hash, "calibration_tokens": data.calibration.numel(),
                 "evaluation_tokens": data.evaluation.numel()},
        "sensitivity": {"estimator": table.estimator, "params": table.params, "wall_time_s": table.wall_time_s,
                        "peak_rss_bytes": table.peak_rss_bytes, "cache_file": str(table_path)},
        "solver": {"name": solver.name, "slack_bytes": getattr(solver, "slack_bytes", 0), "front_size": len(front),
                   "candidate_evaluations": candidates.counts if candidates else {"screen": 0, "full": 0}},
        "metric": metric.document(),
        "reference": {"bytes": fp_bytes, "mib": round(mib(fp_bytes), 6), metric.quality: reference.quality,
                      "tokens": reference.tokens},
        "points": rows,
        "uniform": uniform_rows,
        "proxy_front": {"bytes": [c.bytes for c in front], "predicted": [c.predicted for c in front]},
        "memory": {"quant_cache_bytes": ws.cache.nbytes, "reference_bytes": _reference_bytes(data.evaluation, model)},
    }


def _reference_bytes(tokens: torch.Tensor, model: LoadedModel) -> int:
    """What an evaluator's FP reference holds: float32 log-probabilities over the vocabulary per token, or the
    final hidden state per token."""
    return tokens.numel() * memory_plan.output_width(model) * 4


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


def check_output(out: Path, field: str) -> None:
    """Refuse, before any work, an output dir that holds something other than an earlier run's results, or one
    that cannot be written."""
    if out.exists() and (not out.is_dir() or (not (out / "front.json").is_file() and any(out.iterdir()))):
        raise BitallocError(field, f"{str(out)!r} exists and holds something other than bitalloc results")
    configio.check_writable(out, field)


def _publish(staging: Path, out: Path) -> None:
    """Move the finished results into place, replacing an earlier run's."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
