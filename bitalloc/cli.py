"""The `bitalloc` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer's own copy of click raises these

from .errors import BitallocError, Interrupted, raise_on_signals

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-precision bit-allocation search.")


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
        if job is not None:
            raise BitallocError("--resume", "takes the job's output dir alone; its spec is read from there")
        spec = resume_spec(resume)
        target = resume
    elif job is None:
        raise BitallocError("JOB", "give a job YAML (e.g. jobs/examples/smollm2.yaml) or --resume DIR")
    else:
        spec = load_spec(job, overrides)
        target = out or spec.output_dir()
    try:
        front = run_job(spec, target, resume=resume is not None, verbose=verbose)
    except Interrupted as exc:
        exc.hint = interrupted_hint(target)
        raise
    _out().print(front_table(front))
    mem = front["memory"]
    _out().print(
        f"quantized-weight cache {mem['quant_cache_bytes'] / 2**20:.0f} MiB, FP reference "
        f"{mem['reference_bytes'] / 2**20:.0f} MiB; results in {target}/ (front.json, configs/, plots/)"
    )
    if front.get("tracking"):
        _out().print(f"MLflow run {front['tracking']['run_id']} in {front['tracking']['uri']}; browse it with "
                     f"`bitalloc ui {target}`")


ADDRESS_HELP = "Ray Jobs server (default: RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)"


@app.command()
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
    job_id = submit_job(spec, out or spec.output_dir(), address, pip)
    _out().print(job_id)


@app.command()
def status(job_id: str = typer.Argument(..., metavar="ID"),
           address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """A submitted job's status."""
    from bitalloc.jobs.service import status as job_status

    state, message = job_status(job_id, address)
    _out().print(f"{job_id}: {state}" + (f" ({message})" if message else ""), markup=False)


@app.command()
def logs(job_id: str = typer.Argument(..., metavar="ID"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """A submitted job's output."""
    from bitalloc.jobs.service import logs as job_logs

    job_logs(job_id, address, follow, lambda text: (sys.stdout.write(text), sys.stdout.flush()))


@app.command()
def cancel(job_id: str = typer.Argument(..., metavar="ID"),
           address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Stop a running job."""
    from bitalloc.jobs.service import cancel as cancel_job

    cancel_job(job_id, address)
    _out().print(f"{job_id}: stop requested")


@app.command()
def jobs(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Jobs on the cluster, oldest first."""
    from bitalloc.jobs.service import list_jobs

    table = Table(title="jobs")
    for col in ("id", "status", "bitalloc job", "spec hash"):
        table.add_column(col)
    for info in list_jobs(address):
        meta = info.metadata or {}
        table.add_row(info.submission_id or info.job_id or "", str(info.status.value), meta.get("bitalloc_job", ""),
                      meta.get("spec_hash", "")[:19])
    _out().print(table)


@app.command()
def sensitivity(
    target: str = typer.Argument(..., help="MODEL or a job YAML: compute (or reuse) tables; `score`: score estimators"),
    job: Optional[Path] = typer.Argument(None, help="with `score`: the job YAML"),
    estimator: List[str] = typer.Option([], "--estimator", "-e", help="NAME or NAME:key=value,... (repeatable)"),
    set_: List[str] = typer.Option([], "--set", help="override a spec key: --set data.calibration=2"),
    configs: int = typer.Option(30, "--configs", help="with score: random configs to measure"),
    min_bits: float = typer.Option(2.5, "--min-bits"),
    max_bits: float = typer.Option(6.0, "--max-bits"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the result as JSON"),
):
    """Sensitivity tables (cached by model, data and parameters), or `score JOB.yaml` to rank estimators."""

    from bitalloc.jobs.spec import load_spec, parse_spec
    from bitalloc.sensitivity import ESTIMATORS

    if target == "score":
        if job is None:
            raise BitallocError("JOB", "`bitalloc sensitivity score` needs a job YAML, e.g. jobs/examples/smollm2.yaml")
        if not 0 < min_bits < max_bits:
            raise BitallocError("--min-bits/--max-bits", f"need 0 < min < max, got {min_bits} and {max_bits}")
        if configs < 3:
            raise BitallocError("--configs", f"{configs} is too few to rank anything; use 3 or more")
        _score(load_spec(job, set_), estimator or _default_score_estimators(ESTIMATORS), configs, min_bits, max_bits, out)
        return
    if job is not None:
        raise BitallocError("JOB", f"a second argument is only taken by `score`, got {str(job)!r}")
    spec = (load_spec(target, set_) if target.endswith((".yaml", ".yml"))
            else parse_spec({"model": {"source": target}}, set_))
    _tables(spec, estimator or [spec.sensitivity.estimator], out)


def _default_score_estimators(registry) -> list[str]:
    return sorted(registry) + ["sqnr:activations=true", "fisher:side=weight"]


def _tables(spec, estimators: list[str], out: Optional[Path]) -> None:
    from rich.console import Console as RichConsole

    from bitalloc.jobs.runner import Stages, Workspace
    from bitalloc.jobs.scoring import parse_estimator
    from bitalloc.sensitivity import get_estimator
    from bitalloc.sensitivity import cache as table_cache

    if out is not None and len(estimators) != 1:
        raise BitallocError("--out", "writes one table; name exactly one --estimator")
    instances = [get_estimator(name, **params) for name, params in map(parse_estimator, estimators)]
    with Stages(RichConsole(stderr=True)) as stages:
        ws = Workspace.open(spec, stages)
        results = [ws.sensitivity(est, stages) for est in instances]
    mid = len(ws.formats) // 2
    for table, path, hit in results:
        summary = Table(title=f"{table.estimator} {table.params if table.params else ''}: most sensitive layers "
                              f"at {ws.formats[mid].name} ({'cache hit' if hit else f'{table.wall_time_s:.1f} s'})")
        summary.add_column("layer")
        for fmt in ws.formats:
            summary.add_column(fmt.name, justify="right")
        for i in np.argsort(-table.values[:, mid])[:10]:
            summary.add_row(table.layers[i], *[f"{v:.3g}" for v in table.values[i]])
        _out().print(summary)
        _out().print(f"table: {path}")
        if out is not None:
            from . import configio

            configio.write(table_cache.table_document(table), out)


def _score(spec, estimators: list[str], n: int, lo: float, hi: float, out: Optional[Path]) -> None:

    from rich.console import Console as RichConsole

    from bitalloc.jobs.scoring import score_estimators

    rows, detail = score_estimators(spec, estimators, n, lo, hi, RichConsole(stderr=True))
    table = Table(title=f"estimators on {spec.model.source}: {n} random configs, {lo}-{hi} avg bits, held-out KL")
    for col in ("estimator", "Spearman ρ", "R²", "R² (scaled)", "seconds", "peak RSS GiB", "cached"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    for r in sorted(rows, key=lambda r: -r.spearman):
        peak = f"{r.peak_rss_bytes / 2**30:.2f}" if r.peak_rss_bytes else "-"
        table.add_row(r.estimator, f"{r.spearman:.3f}", f"{r.r2:.3f}", f"{r.r2_scaled:.3f}", f"{r.wall_time_s:.1f}",
                      peak, "yes" if r.cache_hit else "")
    _out().print(table)
    if out is not None:
        from dataclasses import asdict

        from . import configio

        configio.write({"schema": "bitalloc.score/1", "rows": [asdict(r) for r in rows], **detail}, out)


@app.command()
def layers(
    model: str = typer.Argument(..., help="smollm2-135m, a Hugging Face id, a model directory or a .gguf file"),
    bits: List[int] = typer.Option([2, 3, 4, 5, 6, 8], "--bits"),
    group_size: int = typer.Option(64, "--group-size"),
    symmetric: bool = typer.Option(False, "--symmetric/--asymmetric"),
    scale_dtype: str = typer.Option("float16", "--scale-dtype"),
):
    """List the quantizable layers with their shapes and bytes at each format."""
    from .formats import Format, weight_bytes
    from .model import list_layers, load_model

    formats = []
    for b in bits:
        try:
            formats.append(Format(b, group_size, symmetric, scale_dtype))
        except BitallocError as exc:
            raise BitallocError(exc.field.replace("format.", "--").replace("_", "-"), exc.message) from None
    loaded = load_model(model)
    found = list_layers(loaded)
    table = Table(title=f"{model}: {len(found)} quantizable layers")
    for col in ["layer", "out x in", "dtype", "tied to"] + [f.name for f in formats]:
        table.add_column(col, justify="left" if col in ("layer", "tied to") else "right")
    for layer in found:
        table.add_row(
            layer.name, f"{layer.out_features} x {layer.in_features}", layer.dtype, layer.tied_to or "",
            *[f"{weight_bytes(layer.out_features, layer.in_features, f):,}" for f in formats],
        )
    _out().print(table)


# what `export` and `pack` both take to name one measured config
Target = Annotated[str, typer.Argument(help="a job's output dir or MLflow run id (the job's, or one point's)")]
AvgBits = Annotated[Optional[float], typer.Option("--avg-bits", help="lowest-KL measured config within this many "
                                                                     "average bits")]
Budget = Annotated[Optional[str], typer.Option("--budget", help="... within this size, e.g. 60MiB")]
Point = Annotated[Optional[int], typer.Option("--point", help="mixed front point N (numbered by size, as in the "
                                                              "front table)")]
RunStore = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store of RUN_ID (default: "
                                                 "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")]


@app.command()
def export(
    target: Target,
    avg_bits: AvgBits = None,
    budget: Budget = None,
    point: Point = None,
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="json, yaml, gptqmodel, llmcompressor, "
                                      "llamacpp, hqq (default: json or yaml by the output's suffix)"),
    output: Path = typer.Option(..., "-o", "--output", help="file to write"),
    nearest: bool = typer.Option(False, "--nearest", help="where the runtime cannot express a layer's format, "
                                                          "write the nearest it can"),
    tracking_uri: RunStore = None,
):
    """Write one measured config for a runtime: canonical JSON/YAML, GPTQModel, llm-compressor, llama.cpp, HQQ."""
    from bitalloc.jobs.export import choose, resolve_format, write_export
    from bitalloc.metrics import metric_of

    from . import configio

    fmt = resolve_format(fmt, output)
    configio.check_writable(output, "--output")
    chosen = choose(target, avg_bits, budget, point, tracking_uri)
    changed, checked = write_export(chosen, fmt, output, nearest)
    totals, metrics = chosen.config["totals"], chosen.config["metrics"]
    m = metric_of(chosen.config)
    kl = f", {m.loss_label} {metrics[m.loss]:.4f}, {m.quality_label} {metrics[m.quality]:.4g}" if m.loss in metrics else ""
    _out().print(f"wrote {output} ({fmt}) from {chosen.where}: {totals['avg_bits']:.3f} avg bits, "
                 f"{totals['mib']:.2f} MiB{kl}; {checked}", markup=False)
    for line in changed:
        _out().print(f"  nearest: {line}", markup=False)


@app.command()
def pack(
    target: Target,
    avg_bits: AvgBits = None,
    budget: Budget = None,
    point: Point = None,
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint folder to write"),
    tracking_uri: RunStore = None,
):
    """Write a packed checkpoint (safetensors + config) of one measured config; load it with bitalloc.load_packed."""
    from bitalloc.jobs.export import choose
    from bitalloc.kernels.checkpoint import CONFIG_FILE, quantize_model, save_packed

    from . import configio
    from .model import load_model

    if output.exists() and not (output.is_dir() and ((output / CONFIG_FILE).is_file() or not any(output.iterdir()))):
        raise BitallocError("--output", f"{str(output)!r} exists and is not a packed checkpoint")
    configio.check_writable(output, "--output")
    chosen = choose(target, avg_bits, budget, point, tracking_uri)
    doc = chosen.config
    model = load_model(doc["model"]["source"])  # never with remote code: the config file names the model
    if model.content_hash() != doc["model"]["content_hash"]:
        raise BitallocError("TARGET", f"the model at {doc['model']['source']!r} is not the one searched (content "
                                      f"hash differs); rerun the job")
    packed = quantize_model(model, configio.config_formats(doc))
    save_packed(model, doc, output)
    size = sum(f.stat().st_size for f in output.iterdir())
    _out().print(f"wrote {output}/: {doc['totals']['avg_bits']:.3f} avg bits; packed layers {packed:,} bytes, "
                 f"checkpoint files {size / 2**20:.2f} MiB (the config counts {doc['totals']['mib']:.2f} MiB)",
                 markup=False)


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
    from rich.console import Console as RichConsole

    from bitalloc.jobs.runner import Stages
    from bitalloc.kernels.latency import latency_table, require_cuda

    from . import configio
    from .formats import Format
    from .model import list_layers, load_model

    require_cuda()
    formats = [Format(b, group_size, symmetric) for b in bits]
    shapes = {(l.out_features, l.in_features) for l in list_layers(load_model(model))}
    with Stages(RichConsole(stderr=True)) as stages, stages.stage("time layer shapes", len(shapes)) as advance:
        table = latency_table(shapes, formats, batch, advance)
    configio.write(table, output)
    _out().print(f"wrote {output}: {len(table['entries'])} entries on {table['device']}")


@app.command()
def ui(
    target: Optional[str] = typer.Argument(None, help="a job's output dir or job YAML (default: the whole store)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: the job's, "
                                               "else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"),
    port: int = typer.Option(5000, "--port", min=0, max=65535, help="loopback port; 0 picks a free one"),
):
    """Start the MLflow UI on loopback for the job's store and print its experiment's URL (Ctrl-C stops it)."""
    import time

    from bitalloc.dashboards.ui import experiment_url, locate, serve

    uri, exp_id = locate(target, tracking_uri)
    if uri.startswith(("http://", "https://")):
        _out().print(experiment_url(uri.rstrip("/"), exp_id))
        return
    try:
        with serve(uri, port) as base:
            _out().print(f"MLflow UI for {uri}: {experiment_url(base, exp_id)}  (Ctrl-C stops it)")
            while True:
                time.sleep(3600)
    except Interrupted:
        _out().print("MLflow UI stopped")


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
        field = (param.opts or [param.name])[0] if param is not None and getattr(param, "opts", None) else "usage"
        print(_one_line(f"error: {field}: {exc.format_message()}{where}"), file=sys.stderr)
        raise SystemExit(2) from None
    except (Interrupted, KeyboardInterrupt) as exc:
        hint = getattr(exc, "hint", "") or "nothing was written"
        print(f"interrupted: {hint}", file=sys.stderr)
        raise SystemExit(130) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
