"""The `bitalloc` command line: arguments in, one call into the library, results out. Sub-apps: `jobs` (a Ray
cluster's jobs) and `sensitivity` (tables, estimator scores)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer's own copy of click
from typer.core import TyperGroup

from .errors import BitallocError, Interrupted, raise_on_signals

MOVED = {name: f"jobs {name}" for name in ("submit", "status", "logs", "cancel")}


class _Root(TyperGroup):
    """Names a command that moved into a sub-app instead of calling it unknown."""

    def resolve_command(self, ctx, args):
        if args and args[0] in MOVED:
            raise UsageError(f"`bitalloc {args[0]}` is now `bitalloc {MOVED[args[0]]}`", ctx)
        return super().resolve_command(ctx, args)


class _WithDefault(TyperGroup):
    """A sub-app whose first command runs when the arguments name none (`bitalloc jobs` lists jobs,
    `bitalloc sensitivity MODEL` computes tables)."""

    empty_runs_default = False

    def parse_args(self, ctx, args):
        help_asked = args[:1] in (["--help"], ["-h"])
        if (args or self.empty_runs_default) and not help_asked and (not args or args[0] not in self.commands):
            args = [next(iter(self.commands))] + list(args)
        return super().parse_args(ctx, args)


class _JobsGroup(_WithDefault):
    empty_runs_default = True


app = typer.Typer(cls=_Root, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-precision bit-allocation search.")
jobs_app = typer.Typer(cls=_JobsGroup, help="Jobs on a Ray cluster: list (default), submit, status, logs, cancel.")
sensitivity_app = typer.Typer(cls=_WithDefault, no_args_is_help=True,
                              help="Sensitivity tables (default: `table`), or `score` to rank estimators.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(sensitivity_app, name="sensitivity")


def _out() -> Console:
    """stdout; wide when piped or captured, so layer names and table rows are never wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=240)


@app.command()
def run(
    job: Optional[Path] = typer.Argument(None, help="job spec (YAML), e.g. jobs/examples/smollm2.yaml"),
    set_: List[str] = typer.Option([], "--set", help="override a spec key: --set data.evaluation=2"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: the spec's `output`)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the interrupted job that writes to DIR"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to evaluate on (default: RAY_ADDRESS, "
                                                                  "else an embedded local Ray)"),
    workers: Optional[str] = typer.Option(None, "--workers", help="evaluation workers: 0 (this process), N or auto"),
    packages: Optional[Path] = typer.Option(None, "--packages", help="refuse to run unless the installed versions "
                                                                     "match this file (set by `bitalloc submit`)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: "
                                               "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Ray's own log lines here (default: OUT/job.log)"),
    fresh: bool = typer.Option(False, "--fresh", help="discard an interrupted job's results in the output dir "
                                                      "instead of refusing (see --resume)"),
):
    """Run a search job: sensitivity, the whole proxy front, measured points and uniform baselines."""
    from bitalloc.dashboards.table import front_table
    from bitalloc.jobs.runner import interrupted_hint, resume_spec, run_job
    from bitalloc.jobs.spec import load_spec

    if packages is not None:
        from bitalloc.jobs.service import check_packages

        check_packages(packages)
    overrides = (list(set_) + ([f"run.address={address}"] if address else [])
                 + ([f"run.workers={workers}"] if workers else [])
                 + ([f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    if resume is not None:
        if job is not None or fresh:
            raise BitallocError("--resume", "takes the job's output dir alone (no JOB, no --fresh); its spec is read "
                                            "from there")
        spec = resume_spec(resume)
        target = resume
    elif job is None:
        raise BitallocError("JOB", "give a job YAML (e.g. jobs/examples/smollm2.yaml) or --resume DIR")
    else:
        spec = load_spec(job, overrides)
        target = out or spec.output_dir()
    try:
        field = "--resume" if resume is not None else "--out" if out is not None else "output"
        front = run_job(spec, target, resume=resume is not None, verbose=verbose, fresh=fresh, field=field)
    except Interrupted as exc:
        exc.hint = interrupted_hint(target)
        raise
    _out().print(front_table(front))
    mem = front.memory
    _out().print(
        f"levels {mem.level_store_bytes / 2**20:.0f} MiB on disk, working set {mem.working_set_bytes / 2**20:.0f} MiB, "
        f"FP reference {mem.reference_bytes / 2**20:.0f} MiB; results in {target}/ (front.json, configs/, plots/)"
    )
    if front.tracking:
        _out().print(f"MLflow run {front.tracking.run_id} in {front.tracking.uri}; browse it with "
                     f"`bitalloc ui {target}`")


ADDRESS_HELP = "Ray Jobs server (default: RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)"


@jobs_app.command("list")
def list_jobs(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Jobs on the cluster, oldest first."""
    from bitalloc.dashboards.table import jobs_table
    from bitalloc.jobs.service import list_jobs as cluster_jobs

    _out().print(jobs_table(cluster_jobs(address)))


@jobs_app.command()
def submit(
    job: Path = typer.Argument(..., help="job spec (YAML)"),
    set_: List[str] = typer.Option([], "--set", help="override a spec key"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir on the cluster's filesystem (made absolute)"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    pip: bool = typer.Option(False, "--pip", help="have Ray install this machine's package versions for the job"),
):
    """Submit a job to a Ray cluster; prints its id."""
    from bitalloc.jobs.service import submit as submit_job
    from bitalloc.jobs.spec import load_spec

    spec = load_spec(job, set_)
    _out().print(submit_job(spec, out or spec.output_dir(), address, pip))


@jobs_app.command()
def status(job_id: str = typer.Argument(..., metavar="ID"),
           address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """A submitted job's status."""
    from bitalloc.jobs.service import status as job_status

    state, message = job_status(job_id, address)
    _out().print(f"{job_id}: {state}" + (f" ({message})" if message else ""), markup=False)


@jobs_app.command()
def logs(job_id: str = typer.Argument(..., metavar="ID"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """A submitted job's output."""
    from bitalloc.jobs.service import logs as job_logs

    job_logs(job_id, address, follow, lambda text: (sys.stdout.write(text), sys.stdout.flush()))


@jobs_app.command()
def cancel(job_id: str = typer.Argument(..., metavar="ID"),
           address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Stop a running job."""
    from bitalloc.jobs.service import cancel as cancel_job

    cancel_job(job_id, address)
    _out().print(f"{job_id}: stop requested")


@sensitivity_app.command("table")
def sensitivity_table(
    target: str = typer.Argument(..., help="smollm2-135m, a model directory, a .gguf file, or a job YAML"),
    estimator: List[str] = typer.Option([], "--estimator", "-e", help="NAME or NAME:key=value,... (repeatable)"),
    set_: List[str] = typer.Option([], "--set", help="override a spec key: --set data.calibration=2"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the table as JSON"),
):
    """Compute (or reuse from the cache) sensitivity tables; prints each one's most sensitive layers."""
    from bitalloc.dashboards.table import sensitivity_summary
    from bitalloc.jobs.scoring import tables
    from bitalloc.jobs.spec import load_spec, parse_spec

    spec = (load_spec(target, set_) if target.endswith((".yaml", ".yml"))
            else parse_spec({"model": {"source": target}}, set_))
    if out is not None and len(estimator) > 1:
        raise BitallocError("--out", "writes one table; name exactly one --estimator")
    if out is not None:
        from . import configio

        configio.check_writable(out, "--out")
    for result in tables(spec, estimator or [spec.sensitivity.estimator], Console(stderr=True), out):
        _out().print(sensitivity_summary(result))
        _out().print(f"table: {result.path}")


@sensitivity_app.command("score")
def sensitivity_score(
    job: Path = typer.Argument(..., help="the job YAML whose model, data and formats to score on"),
    estimator: List[str] = typer.Option([], "--estimator", "-e", help="NAME or NAME:key=value,... (repeatable; "
                                        "default: every estimator and two variants)"),
    set_: List[str] = typer.Option([], "--set", help="override a spec key: --set data.calibration=2"),
    configs: int = typer.Option(30, "--configs", min=3, help="random configs to measure"),
    min_bits: float = typer.Option(2.5, "--min-bits"),
    max_bits: float = typer.Option(6.0, "--max-bits"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the scores as JSON"),
):
    """Rank estimators by how well their tables predict measured held-out loss of random configs."""
    from bitalloc.dashboards.table import score_table
    from bitalloc.jobs.scoring import default_estimators, score_estimators
    from bitalloc.jobs.spec import load_spec

    if not 0 < min_bits < max_bits <= 32:
        raise BitallocError("--min-bits/--max-bits", f"need 0 < min < max <= 32, got {min_bits} and {max_bits}")
    spec = load_spec(job, set_)
    scores = score_estimators(spec, estimator or default_estimators(), configs, min_bits, max_bits,
                              Console(stderr=True), out)
    _out().print(score_table(scores, spec.model.source))


@app.command()
def layers(
    model: str = typer.Argument(..., help="smollm2-135m, a Hugging Face id, a model directory or a .gguf file"),
    bits: List[int] = typer.Option([2, 3, 4, 5, 6, 8], "--bits"),
    group_size: int = typer.Option(64, "--group-size"),
    symmetric: bool = typer.Option(False, "--symmetric/--asymmetric"),
    scale_dtype: str = typer.Option("float16", "--scale-dtype"),
):
    """List the quantizable layers with their shapes and bytes at each format."""
    from .formats import Format
    from .model import coverage, list_layers, load_model, uncovered

    formats = []
    for b in bits:
        try:
            formats.append(Format(b, group_size, symmetric, scale_dtype))
        except BitallocError as exc:
            raise BitallocError(exc.field.replace("format.", "--").replace("_", "-"), exc.message) from None
    from bitalloc.dashboards.table import layers_table

    loaded = load_model(model)
    layers = list_layers(loaded)
    _out().print(layers_table(model, layers, formats, uncovered(loaded, layers), coverage(loaded, layers)))


@app.command()
def quantizers():
    """List the quantizers (formats.method) with their parameters, and the runtime targets (formats.target)."""
    from rich.table import Table

    from .quantizers import QUANTIZERS
    from .runtimes import RUNTIMES

    table = Table("method", "version", "params (default)", "calibration", "what it does", title="quantizers")
    for name, cls in sorted(QUANTIZERS.items()):
        q = cls()
        params = ", ".join(f"{k}={v}" for k, v in q.params().items()) or "-"
        reads = {"hessian": "input XᵀX", "diagonal": "input x²"}.get(q.inputs, "imatrix (optional)" if name == "gguf"
                                                                      else "-")
        table.add_row(name, str(cls.version), params, reads, cls.summary)
    _out().print(table)
    targets = Table("target", "methods (default first)", "formats", title="runtime targets")
    for t in (cls() for cls in RUNTIMES.values()):
        names = [f.name for f in t.formats(t.methods[0], {})]
        targets.add_row(t.name, ", ".join(t.methods), f"{len(names)}: {' '.join(names)}\n{t.summary}")
    _out().print(targets)


# the runtimes (bitalloc.runtimes: a test keeps these in step with the registry, which imports torch to list)
RUNTIME_NAMES = ("llamacpp", "gptqmodel", "llmcompressor", "hqq", "bitalloc")
RECIPES = tuple(n for n in RUNTIME_NAMES if n != "bitalloc")  # those with a recipe file (bitalloc's is `pack`)

# what `export` and `pack` both take to name one measured config
Target = Annotated[str, typer.Argument(help="a job's output dir or MLflow run id (the job's, or one point's)")]
AvgBits = Annotated[Optional[float], typer.Option("--avg-bits", help="lowest-KL measured config within this many "
                                                                     "average bits")]
Budget = Annotated[Optional[str], typer.Option("--budget", help="... within this size, e.g. 60MiB")]
Point = Annotated[Optional[int], typer.Option("--point", help="mixed front point N: the N-th mixed row of the front "
                                                              "table by size (a spread row is labelled mixed #N)")]
RunStore = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store of RUN_ID (default: "
                                                 "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")]


@app.command()
def export(
    target: Target,
    avg_bits: AvgBits = None,
    budget: Budget = None,
    point: Point = None,
    export_format: Optional[str] = typer.Option(None, "--format", "-f", help=f"json, yaml, {', '.join(RECIPES)} "
                                                "(default: json or yaml by the output's suffix)"),
    output: Path = typer.Option(..., "-o", "--output", help="file to write"),
    nearest: bool = typer.Option(False, "--nearest", help="where the runtime cannot express a layer's format, "
                                                          "write the nearest it can"),
    tracking_uri: RunStore = None,
    force: bool = typer.Option(False, "--force", help="replace OUTPUT if it exists"),
):
    """Write one measured config for a runtime: canonical JSON/YAML, GPTQModel, llm-compressor, llama.cpp, HQQ."""
    from bitalloc.jobs.export import check_new_file, choose, resolve_export_format, write_export

    export_format = resolve_export_format(export_format, output)
    check_new_file(output, force)
    chosen = choose(target, avg_bits, budget, point, tracking_uri)
    changed, checked, notes = write_export(chosen, export_format, output, nearest)
    config, m, measured = chosen.config, chosen.config.metric.metric(), chosen.config.measured()
    kl = f", {m.loss_label} {measured[0]:.4f}, {m.quality_label} {measured[1]:.4g}" if measured else ""
    _out().print(f"wrote {output} ({export_format}) from {chosen.where}: {config.totals.avg_bits:.3f} avg bits, "
                 f"{config.totals.mib:.2f} MiB{kl}; {checked}", markup=False)
    for line in changed:
        _out().print(f"  nearest: {line}", markup=False)
    for line in notes:
        _out().print(f"  note: {line}", markup=False)


@app.command()
def verify(
    target: Target,
    avg_bits: AvgBits = None,
    budget: Budget = None,
    point: Point = None,
    runtime: str = typer.Option(..., "--runtime", "-r", help=", ".join(RUNTIME_NAMES)),
    presets: bool = typer.Option(False, "--presets", help="also measure llama.cpp's presets (Q2_K ... Q8_0) the same "
                                                          "way"),
    nearest: bool = typer.Option(False, "--nearest", help="where the runtime cannot express a layer's format, build "
                                                          "the nearest it can (as `export --nearest` writes it)"),
    recipe: bool = typer.Option(False, "--recipe", help="a Python runtime quantizes the model itself from the "
                                                        "exported recipe, instead of loading `build`'s artifact"),
    tracking_uri: RunStore = None,
):
    """Load one measured point in its runtime with the runtime's own code — the artifact `build` writes from the
    levels, or with --recipe what the runtime quantizes from the exported file — run it on the job's held-out
    tokens, and compare what it gives with what the front measured and counted."""
    from rich.table import Table

    from bitalloc.jobs.verify import verify as run_verify

    picked, points = run_verify(target, avg_bits, budget, point, runtime, presets, nearest, tracking_uri,
                                Console(stderr=True), recipe)
    m = picked.front.metric.metric()
    table = Table("runtime", "point", "MiB", "stored / counted layer bytes", f"bitalloc {m.loss_label} (front)",
                  f"bitalloc {m.loss_label} (same tokens)", f"runtime {m.loss_label}", "difference",
                  f"runtime {m.quality_label}", "file MiB", title=f"{picked.front.model.source}: {picked.point.label} "
                                                                  f"as {runtime} builds it")
    for p in points:
        ratio = (f"{p.stored_layer_bytes:,} / {p.counted_layer_bytes:,} ({p.bytes_rel_diff:+.2%})"
                 if p.counted_layer_bytes else f"{p.stored_layer_bytes:,}")
        same = f"{p.bitalloc_loss:.4f}" if p.bitalloc_loss is not None else "-"
        diff = f"{p.loss_rel_diff:+.1%}" if p.loss_rel_diff is not None else "-"
        front_kl = f"{picked.point.loss:.4f}" if p.kind == "point" else "-"
        table.add_row(p.runtime, p.label, f"{p.mib:.2f}", ratio, front_kl, same, f"{p.loss:.4f}", diff,
                      f"{p.quality:.4g}", f"{p.file_bytes / 2**20:.2f}")
    _out().print(table)
    for p in points:
        if p.details.get("nearest_layers"):
            _out().print(f"{p.label}: {p.details['nearest_layers']:.0f} layers built as the nearest the runtime "
                         f"expresses, so the runtime measures another model than the front's point", markup=False)
        if p.details and p.kind == "point":
            _out().print(f"{p.label}: " + ", ".join(f"{k} {v:.3g}" for k, v in p.details.items()), markup=False)
    _out().print(f"recorded in {picked.folder / 'front.json'}" if Path(target).is_dir()
                 else f"logged to MLflow run {target}", markup=False)


@app.command()
def build(
    target: Target,
    avg_bits: AvgBits = None,
    budget: Budget = None,
    point: Point = None,
    runtime: str = typer.Option(..., "--runtime", "-r", help="llamacpp (a .gguf), llmcompressor (compressed-tensors), "
                                                             "gptqmodel (GPTQ), hqq (HQQ's saved model) or bitalloc "
                                                             "(a packed checkpoint)"),
    output: Path = typer.Option(..., "-o", "--output", help="the artifact to write"),
    force: bool = typer.Option(False, "--force", help="replace OUTPUT if it exists"),
    nearest: bool = typer.Option(False, "--nearest", help="write layers the runtime cannot store as measured at its "
                                                          "nearest format, made by its own quantizer (a model the "
                                                          "front did not measure; the card says which layers)"),
    tracking_uri: RunStore = None,
):
    """Write the model a runtime serves for one measured point, from the job's levels (never quantized again), with a
    model card: what the front measured, byte for byte."""
    from bitalloc.jobs.build import build as run_build

    built = run_build(target, avg_bits, budget, point, runtime, output, force, tracking_uri, Console(stderr=True),
                      nearest)
    p, doc = built.picked.point, built.picked.config
    m = built.picked.front.metric.metric()
    whose = built.picked.front.model.bytes_of or "bitalloc's count"
    if built.bytes - built.card_bytes == built.counted:
        size = f"{built.bytes:,} bytes: the front's {built.counted:,} + {built.card_bytes:,} of model card"
    else:
        size = f"{built.bytes:,} bytes on disk; the front counts {built.counted:,} ({whose})"
    changed = built.details.get("nearest_layers")
    if changed:
        size += (f"; {changed} layers at {runtime}'s nearest format (--nearest), made by its own quantizer: not the "
                 f"model whose {m.loss_label} this is (verify --nearest measures it)")
    _out().print(f"wrote {output} ({runtime}) from {built.picked.folder}: {p.label}, {doc.totals.avg_bits:.3f} avg "
                 f"bits, {m.loss_label} {p.loss:.4f}, {m.quality_label} {p.quality:.4g}; {size}; "
                 f"{built.seconds:.1f} s", markup=False)


@app.command()
def pack(
    target: Target,
    avg_bits: AvgBits = None,
    budget: Budget = None,
    point: Point = None,
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint folder to write"),
    tracking_uri: RunStore = None,
):
    """`build --runtime bitalloc`: a packed checkpoint (safetensors + config + model card) of one measured config,
    replacing an earlier one at OUTPUT; load it with bitalloc.load_packed."""
    from bitalloc.jobs.build import build as run_build
    from bitalloc.runtimes.bitalloc.checkpoint import check_output

    check_output(output, "--output")
    built = run_build(target, avg_bits, budget, point, "bitalloc", output, True, tracking_uri, Console(stderr=True))
    _out().print(f"wrote {output}/: {built.picked.config.totals.avg_bits:.3f} avg bits; packed layers "
                 f"{built.details['packed_layer_bytes']:,} bytes, checkpoint files {built.bytes / 2**20:.2f} MiB "
                 f"(the config counts {built.picked.config.totals.mib:.2f} MiB)", markup=False)


@app.command()
def latency(
    model: str = typer.Argument(..., help="smollm2-135m, a Hugging Face id, a model directory or a .gguf file"),
    output: Path = typer.Option(..., "-o", "--output", help="table to write (.json), for search.latency_table"),
    bits: List[int] = typer.Option([2, 3, 4, 5, 6, 8, 16], "--bits"),
    group_size: int = typer.Option(64, "--group-size"),
    symmetric: bool = typer.Option(False, "--symmetric/--asymmetric"),
    batch: int = typer.Option(1, "--batch", min=1),
):
    """Measure every layer shape x format on this GPU (CUDA events, L2 cleared, median) for the ILP's latency limit."""
    from bitalloc.kernels.latency import latency_table, require_cuda
    from bitalloc.progress import Stages

    from . import configio
    from .formats import Format
    from .model import list_layers, load_model

    require_cuda()
    formats = [Format(b, group_size, symmetric) for b in bits]
    shapes = {(l.out_features, l.in_features) for l in list_layers(load_model(model))}
    with Stages(Console(stderr=True)) as stages, stages.stage("time layer shapes", len(shapes)) as advance:
        table = latency_table(shapes, formats, batch, advance)
    configio.write(table, output)
    _out().print(f"wrote {output}: {len(table['entries'])} entries on {table['device']}")


@app.command()
def schema(kind: str = typer.Argument(..., metavar="KIND", help="front or config")):
    """Print the JSON Schema of front.json (`front`) or of a config file (`config`)."""
    import json

    from .results import json_schema

    sys.stdout.write(json.dumps(json_schema(kind), indent=2, sort_keys=True) + "\n")


@app.command()
def ui(
    target: Optional[str] = typer.Argument(None, help="a job's output dir or job YAML (default: the whole store)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: the job's, "
                                               "else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"),
    port: int = typer.Option(5000, "--port", min=0, max=65535, help="loopback port; 0 picks a free one"),
):
    """Start the MLflow UI on loopback for the job's store and print the URL of the job's front figure (of a job YAML:
    its experiment's runs) (Ctrl-C stops it)."""
    import time

    from bitalloc.dashboards.ui import landing_url, locate, serve

    where = locate(target, tracking_uri)
    if where.uri.startswith(("http://", "https://")):
        _out().print(landing_url(where.uri.rstrip("/"), where))
        return
    starting = lambda base: print(f"starting the MLflow UI on {base} (it answers in a few seconds)",  # noqa: E731
                                  file=sys.stderr)
    try:
        with serve(where.uri, port, starting=starting) as base:
            _out().print(f"MLflow UI for {where.uri}: {landing_url(base, where)}  (Ctrl-C stops it)")
            while True:
                time.sleep(3600)
    except Interrupted as exc:
        exc.hint = "the MLflow UI stopped"
        raise


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Every failure ends as one line on stderr: exit 2 for bad input, 130 for Ctrl-C / SIGTERM."""
    raise_on_signals()
    try:
        code = app(args=argv, standalone_mode=False)
    except BitallocError as exc:
        print(_one_line(f"error: {exc.field}: {exc.message}"), file=sys.stderr)
        raise SystemExit(2) from None
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message(), file=sys.stderr)
        raise SystemExit(2) from None
    except ClickException as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
        param = getattr(exc, "param", None)
        field = "usage" if param is None else (param.opts[0] if param.param_type_name == "option"
                                               else param.metavar or param.name.upper())
        print(_one_line(f"error: {field}: {exc.format_message()}{where}"), file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:  # a path the system refuses (a name too long, a folder not writable, ...): said in one line
        where = exc.filename if isinstance(exc.filename, str) else "path"
        shown = where if len(where) <= 80 else f"{where[:40]}...{where[-20:]} ({len(where)} characters)"
        print(_one_line(f"error: {shown}: {exc.strerror or exc}"), file=sys.stderr)
        raise SystemExit(2) from None
    except (Interrupted, KeyboardInterrupt) as exc:
        hint = getattr(exc, "hint", "") or "nothing was written"
        print(f"interrupted: {hint}", file=sys.stderr)
        raise SystemExit(130) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
