"""`bitalloc export`: pick one measured config of a job (a result dir or an MLflow run) and write it
in a runtime's format (see `runtimes`), checked by that runtime's own parser where it is installed."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.metrics import metric_of
from bitalloc.units import parse_bytes

from . import runtime_checks
from .runtimes import RUNTIMES, Layer, export

CANONICAL = ("json", "yaml")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def format_names() -> list[str]:
    return list(CANONICAL) + sorted(RUNTIMES.classes)


def resolve_format(fmt: Optional[str], output: Path) -> str:
    """The export format: as given, else json/yaml by the output's suffix; unknown names are refused."""
    if fmt is None:
        fmt = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(output.suffix)
        if fmt is None:
            raise BitallocError("--format", f"cannot tell the format from {output.name!r}; give --format "
                                            f"({', '.join(format_names())})")
    if fmt not in format_names():
        raise BitallocError("--format", f"{fmt!r} is not an export format; allowed: {', '.join(format_names())}")
    return fmt


@dataclass
class Chosen:
    config: dict
    row: Optional[dict]
    where: str


def _pick(front: dict, avg_bits: Optional[float], budget: Optional[str], point: Optional[int]) -> dict:
    """The front row a selector names: the lowest-KL measured config within a budget, or mixed point N."""
    if sum(x is not None for x in (avg_bits, budget, point)) != 1:
        raise BitallocError("--avg-bits/--budget/--point", "give exactly one of them")
    points = sorted(front["points"], key=lambda p: p["bytes"])
    if point is not None:
        if not 1 <= point <= len(points):
            raise BitallocError("--point", f"{point} is not on the front; points are numbered 1 to {len(points)}")
        return points[point - 1]
    model = front["model"]
    if budget is not None:
        limit, field = parse_bytes(budget, "--budget"), "--budget"
    else:
        limit, field = model["other_bytes"] + int(avg_bits * model["quantized_params"] / 8), "--avg-bits"
    candidates = front["points"] + front["uniform"]
    fitting = [c for c in candidates if c["bytes"] <= limit]
    if not fitting:
        smallest = min(candidates, key=lambda c: c["bytes"])
        raise BitallocError(field, f"no measured config fits; the smallest is {smallest['bytes']} bytes "
                                   f"({smallest['mib']:.2f} MiB, {smallest['avg_bits']:.3f} avg bits)")
    loss = metric_of(front).loss
    return min(fitting, key=lambda c: (c[loss], c["bytes"]))


def from_dir(run_dir: Path, avg_bits, budget, point) -> Chosen:
    if not (run_dir / "front.json").is_file():
        raise BitallocError("TARGET", f"{str(run_dir)!r} holds no front.json; give a job's output dir or run id")
    front = configio.read(run_dir / "front.json", configio.FRONT_SCHEMA)
    row = _pick(front, avg_bits, budget, point)
    return Chosen(configio.read(run_dir / row["config"], configio.CONFIG_SCHEMA), row, str(run_dir))


def from_run(run_id: str, uri: str, avg_bits, budget, point) -> Chosen:
    """A job's parent run (pick from its front) or one point's child run (its config)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from bitalloc.dashboards.tracking import KIND_TAG, client

    try:
        run = client(uri).get_run(run_id)
    except MlflowException:
        raise BitallocError("TARGET", f"no MLflow run {run_id} in {uri}") from None
    kind = run.data.tags.get(KIND_TAG)
    with tempfile.TemporaryDirectory() as tmp:
        def fetch(path: str) -> Path:
            try:
                return Path(download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=uri))
            except (MlflowException, OSError):
                raise BitallocError("TARGET", f"MLflow run {run_id} has no front (no {path}; did the job finish?)"
                                    ) from None

        if kind in ("mixed", "uniform"):
            if any(x is not None for x in (avg_bits, budget, point)):
                raise BitallocError("--avg-bits/--budget/--point", f"run {run_id} is one front point; "
                                                                   f"give its job's run to choose among points")
            name = run.data.tags["bitalloc.config"]
            doc = configio.read(fetch(f"config/{Path(name).name}"), configio.CONFIG_SCHEMA)
            return Chosen(doc, None, f"run {run_id}")
        if kind != "job":
            raise BitallocError("TARGET", f"MLflow run {run_id} is not a bitalloc job or front point")
        front = configio.read(fetch("results/front.json"), configio.FRONT_SCHEMA)
        row = _pick(front, avg_bits, budget, point)
        doc = configio.read(fetch(f"results/{row['config']}"), configio.CONFIG_SCHEMA)
    return Chosen(doc, row, f"run {run_id}")


def choose(target: str, avg_bits, budget, point, tracking_uri: Optional[str]) -> Chosen:
    path = Path(target)
    if path.is_dir():
        return from_dir(path, avg_bits, budget, point)
    if _RUN_ID.match(target):
        from bitalloc.dashboards.tracking import resolve_uri

        return from_run(target, resolve_uri(tracking_uri), avg_bits, budget, point)
    raise BitallocError("TARGET", f"{target!r} is neither a job's output dir nor an MLflow run id (32 hex digits)")


def layers_of(doc: dict) -> list[Layer]:
    shapes = doc.get("shapes")
    if not shapes:
        raise BitallocError("TARGET", "the config records no layer shapes (an older result); rerun the job")
    return [Layer(name, fmt, *shapes[name]) for name, fmt in configio.config_formats(doc).items()]


def write_export(chosen: Chosen, fmt: str, output: Path, nearest: bool) -> tuple[list[str], str]:
    """Write the file atomically; returns (layers written as nearest, what the runtime's parser said)."""
    fmt = resolve_format(fmt, output)
    if fmt in CANONICAL:
        if output.suffix not in ({".json"} if fmt == "json" else {".yaml", ".yml"}):
            raise BitallocError("--output", f"{output.name!r} must end in .{fmt} for --format {fmt}")
        configio.write(chosen.config, output)
        return [], "canonical bitalloc.config/1"
    text, changed = export(fmt, layers_of(chosen.config), chosen.config["model"].get("type"), nearest)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        staged.write_text(text)
        checked = f"not checked: {runtime_checks.LIBRARIES[fmt]} is not installed here"
        if runtime_checks.available(fmt):
            try:
                checked = runtime_checks.check(fmt, str(staged), None if changed else chosen.config)
            except Exception as exc:
                raise BitallocError("--format", f"{fmt} rejected the export: {exc}") from None
        staged.replace(output)
    return changed, checked
