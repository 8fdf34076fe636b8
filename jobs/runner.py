"""Run a job: the pipeline's stages (`bitalloc.pipeline`) driven by a job spec, with what a job adds around them:
where evaluations run (this process or Ray), the memory plan, checkpointed measurements, MLflow tracking, and
staging.

Results are written to a staging folder beside the output dir and moved into place only when the
whole job has succeeded, so an interrupted or failed job never leaves files that look like results.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from bitalloc import configio, pipeline
from bitalloc.dashboards.plots import write_plots
from bitalloc.dashboards.tracking import Tracker, resolve_uri
from bitalloc.data import text_files
from bitalloc.errors import BitallocError
from bitalloc.paths import publish, staging_dir
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.pipeline import Budget, Workspace
from bitalloc.progress import Stages
from bitalloc.results import EvaluationInfo, Front, JobInfo, TrackingInfo
from bitalloc.runtimes import get_runtime
from bitalloc.search import get_solver
from bitalloc.search.constraints import compile_pattern
from bitalloc.sensitivity import get_estimator
from bitalloc.sensitivity.base import Estimator
from bitalloc.tasks import CandidateEvaluator
from bitalloc.types import Problem
from bitalloc.units import mib, parse_bytes

from . import memory_plan
from .checkpoint import Checkpointed
from .spec import JobSpec



def open_workspace(spec: JobSpec, stages: Stages, before_quantize=None) -> Workspace:
    """The pipeline's workspace for the spec's model, formats and data."""
    m, d = spec.model, spec.data
    embeddings, why = spec.embeddings()
    return Workspace.open(m.source, spec.expand_formats(), include=m.include, exclude=m.exclude,
                          embeddings=embeddings, embeddings_why=why, allow_partial=m.allow_partial,
                          trust_remote_code=m.trust_remote_code, text=d.source,
                          seq_len=d.seq_len, calibration=d.calibration, evaluation=d.evaluation,
                          batch_size=d.batch_size, seed=spec.seed, reference=d.reference,
                          quantizers=spec.quantizers(), stages=stages, before_quantize=before_quantize)


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
def open_backend(ws: Workspace, spec: JobSpec, where: str | None, workers: int):
    """The job's evaluation backend (`spec.evaluator()`: torch or llama.cpp): in this process, or Ray workers in the
    session `evaluation_place` opened."""
    evaluator = spec.evaluator()
    if where is None:
        if evaluator == "torch":
            yield ws.local_runner(), "this process"
            return
        from bitalloc.runtimes.llamacpp.evaluator import LlamaCppRunner

        yield LlamaCppRunner(ws.model, ws.levels, ws.token_sets(), ws.batch_size, os.cpu_count() or 1), \
            "this process (llama.cpp)"
        return
    from .workers import RayRunner

    if evaluator == "llamacpp":
        from bitalloc.runtimes.llamacpp.evaluator import check_windows

        check_windows(ws.model, ws.levels, ws.token_sets())
    run = spec.run
    runner = RayRunner(ws.model.module, ws.levels, ws.token_sets(), ws.batch_size, workers, run.threads_per_worker,
                       run.gpus_per_worker, ws.model.metric, ws.reference, evaluator)
    try:
        yield runner, f"{workers} Ray workers on {where}" + ("" if evaluator == "torch" else f" ({evaluator})")
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
    spec.search.constraints().check(spec.expand_formats())
    if spec.evaluator() == "llamacpp" and not all(f.ggml or not f.quantized for f in spec.expand_formats()):
        raise BitallocError("search.evaluator", "llamacpp measures llama.cpp types and 16 bits only (formats.target: "
                                                "llamacpp, or method: gguf); use evaluator: torch, or auto")
    for key in ("include", "exclude"):
        for i, pattern in enumerate(getattr(spec.model, key)):
            compile_pattern(pattern, f"model.{key}[{i}]")
    files = text_files(spec.data.source)
    if not files:
        raise BitallocError("data.source", "names no text file; allowed: 'shakespeare' or paths/globs of text files")
    if not any(f.stat().st_size for f in files):
        raise BitallocError("data.source", f"{', '.join(str(f) for f in files[:3])}: no text in the files")


@dataclass
class _Planned:
    """What the checks before quantizing found: the job's cost model (its errors still to come) and its budgets."""

    problem: Problem | None = None
    budgets: list[Budget] = field(default_factory=list)


def _before_quantize(spec: JobSpec, estimator: Estimator, console: Console, planned: _Planned):
    """The checks that need the model but not its quantized weights: the cost model and budgets (kept in
    `planned`) and the memory plan (printed; a job that cannot fit is refused)."""
    def check(model: LoadedModel, layers: list[QuantizableLayer]) -> None:
        formats = spec.expand_formats()
        for part in spec.formats:
            if part.target:
                get_runtime(part.target).check_experts(layers, "formats.target",
                                                       ", or model.exclude the experts (e.g. 'experts')")
        planned.problem = spec.problem(model, layers)
        # a target whose bytes are its file's: sizes are checked once the file's are known (after the levels)
        planned.budgets = pipeline.resolve_budgets(planned.problem, spec.search.budgets, sizes=not spec.file_sized())
        limit = spec.run.memory_limit
        available = parse_bytes(limit, "run.memory_limit") if limit else memory_plan.available_bytes()
        plan = memory_plan.plan(model, layers, formats, spec, estimator,
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
            verbose: bool = False, fresh: bool = False, field: str = "--out") -> Front:
    """Run the whole job and return its front (also written to OUT/front.json).

    Measurements are checkpointed in OUT's staging dir as they arrive; with `resume`, a job whose
    driver died continues from there and re-runs only what had not finished. The job is tracked as
    an MLflow run (a resumed job reopens its run); plots go to OUT/plots; Ray's own log lines go to
    OUT/job.log unless `verbose`. A job that fails on bad input leaves nothing behind; one that is
    interrupted keeps its staging dir for --resume. `field` names where OUT came from in errors.

    The staging dir is owned: a new job into OUT while an interrupted job's staging is there refuses (pointing at
    `--resume`, or `fresh` to discard it), and a failure removes only staging this job created."""
    console = console or Console(stderr=True)
    out = Path(out) if out is not None else spec.output_dir()
    check_output(out, field)
    estimator = get_estimator(spec.sensitivity.estimator, **spec.sensitivity.params)
    solver = get_solver(spec.search.solver, **spec.search.params)
    preflight(spec, estimator)
    with output_lock(out):
        staging = staging_dir(out)
        if not resume and staging.exists():
            if not fresh:
                raise BitallocError(field, f"an interrupted job's results are in {staging}: continue it with "
                                             f"`bitalloc run --resume {out}`, or discard them with --fresh")
            shutil.rmtree(staging)
        created = not staging.exists()
        staging.mkdir(parents=True, exist_ok=True)
        try:
            (staging / "spec.yaml").write_text(configio.dumps(spec.model_dump(mode="json"), ".yaml"))
            front = _run(spec, out, staging, estimator, solver, console, None if verbose else staging / "job.log")
        except Exception:  # a failure (not a stop: that keeps staging for --resume) removes what it wrote
            if created and not (staging / "checkpoint.jsonl").is_file():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, out)
    return front


def _run(spec: JobSpec, out: Path, staging: Path, estimator: Estimator, solver, console: Console,
         log: Path | None) -> Front:
    planned = _Planned()
    tracker = None
    with Stages(console) as stages, evaluation_place(spec, log) as (place, workers):
        try:
            ws = open_workspace(spec, stages, _before_quantize(spec, estimator, console, planned))
            with open_backend(ws, spec, place, workers) as (runner, where):
                console.print(f"evaluations run in {where}")
                tracker = _start_tracking(spec, ws, out, staging, console)
                backend = Checkpointed(runner, staging / "checkpoint.jsonl")
                res = _search_and_measure(spec, ws, estimator, solver, planned, backend, stages)
            res.front = res.front.model_copy(update={
                "timings_s": stages.timings,
                "evaluations": EvaluationInfo(computed=backend.computed, from_checkpoint=backend.reused, where=where,
                                              evaluator=spec.evaluator()),
                "tracking": TrackingInfo(**tracker.info()) if tracker and tracker.info() else None,
            })
            pipeline.write_results(res, staging)
            with stages.stage("plots"):
                write_plots(staging, res)
        except BaseException:
            if tracker:
                tracker.fail()
            raise
    (staging / "checkpoint.jsonl").unlink()
    (staging / TRACKING_FILE).unlink(missing_ok=True)
    if tracker:
        tracker.finish(res.front, staging)
    return res.front


TRACKING_FILE = "tracking.json"


def _start_tracking(spec: JobSpec, ws: Workspace, out: Path, staging: Path, console: Console) -> Tracker | None:
    """Open the job's MLflow run (or reopen the one an interrupted job left in its staging dir)."""
    if not spec.tracking.enabled:
        return None
    saved = staging / TRACKING_FILE
    previous = json.loads(saved.read_text()) if saved.is_file() else {}
    tracker = Tracker(resolve_uri(spec.tracking.uri), console)
    tags = {"bitalloc.spec_hash": spec.spec_hash(), "bitalloc.seed": str(spec.seed),
            "bitalloc.model_hash": ws.model_hash, "bitalloc.output": str(out.resolve()),
            **{f"package.{k}": v for k, v in pipeline.package_versions().items()}}
    run_id = tracker.start(spec.tracking.experiment or spec.name, spec.name, spec.model_dump(mode="json"), tags,
                           run_id=previous.get("run_id") if previous.get("uri") == tracker.uri else None)
    if run_id is not None:
        saved.write_text(json.dumps(tracker.info()))
        console.print(f"tracking: MLflow run {run_id} in {tracker.uri}")
    return tracker


def _search_and_measure(spec: JobSpec, ws: Workspace, estimator: Estimator, solver, planned: _Planned,
                        backend, stages: Stages) -> pipeline.Results:
    """Sensitivity, the front, the measured points: the pipeline's stages with the spec's settings."""
    file = spec.file_bytes(ws)
    if file is not None:  # the levels are made: the front's bytes become the target's file's
        planned.problem = spec.problem(ws.model, ws.layers, file=file)
        planned.budgets = pipeline.resolve_budgets(planned.problem, spec.search.budgets)
        padded = f", each tensor padded to {file.alignment} bytes" if file.alignment > 1 else ""
        stages.print(f"bytes are the size of {file.runtime}'s {file.kind}: {mib(file.fixed):.2f} MiB of metadata, "
                     f"tokenizer and unsearched tensors{padded}")
    table = pipeline.sensitivity(ws, estimator, spec.seed, stages, backend, spec.evaluator())
    problem, budgets = planned.problem.with_error(table.table), planned.budgets
    evaluator = CandidateEvaluator(backend, spec.search.screen_tokens) if spec.search.evaluations else None
    solved = pipeline.solve_front(solver, problem, budgets, spec.seed, evaluator, spec.search.evaluations, stages)
    chosen = pipeline.candidates(solved, problem, budgets, spec.search.points)
    measured = pipeline.measure(backend, chosen, stages)
    job = JobInfo(name=spec.name, seed=spec.seed, spec_hash=spec.spec_hash(), packages=pipeline.package_versions())
    return pipeline.results(ws, job, table, problem, solved, measured)


def check_output(out: Path, field: str) -> None:
    """Refuse, before any work, an output dir that holds something other than an earlier run's results, or one
    that cannot be written."""
    if out.exists() and (not out.is_dir() or (not (out / "front.json").is_file() and any(out.iterdir()))):
        raise BitallocError(field, f"{str(out)!r} exists and holds something other than bitalloc results")
    configio.check_writable(out, field)
