"""`bitalloc export`: pick one measured config of a job (a result dir or an MLflow run) and write it
in a runtime's format (see `runtimes`), checked by that runtime's own parser where it is installed."""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.formats import weight_bytes
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


_NUMBER = (int, float)


def _check_front(front: dict, where: str) -> None:
    """The parts of a front document that selection relies on, with their types; paths stay inside the result."""
    loss = metric_of(front).loss
    model = front.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), int) for k in
                                              ("other_bytes", "quantized_params", "quantized_layers")):
        raise BitallocError("TARGET", f"{where}: front.json has no valid model section; rerun the job")
    for key in ("points", "uniform"):
        rows = front.get(key)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BitallocError("TARGET", f"{where}: front.json {key} is not a list of rows; rerun the job")
        for row in rows:
            if not (isinstance(row.get("bytes"), int) and isinstance(row.get(loss), _NUMBER)
                    and isinstance(row.get("avg_bits"), _NUMBER) and isinstance(row.get("mib"), _NUMBER)
                    and isinstance(row.get("config"), str)):
                raise BitallocError("TARGET", f"{where}: a front.json {key} row lacks bytes, {loss}, avg_bits, mib "
                                              f"or config; rerun the job")
            _inside(row["config"], where)
    if not front["points"]:
        raise BitallocError("TARGET", f"{where}: front.json has no measured points")


def _inside(relative: str, where: str) -> None:
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BitallocError("TARGET", f"{where}: config path {relative!r} leaves the result folder")


def verified(doc: dict, model: dict, where: str) -> dict:
    """A config whose claims hold: every layer of the search has a format and a shape, and the bytes recount
    from those shapes (plus the model's other tensors) to exactly the total it claims."""
    try:
        formats = configio.config_formats(doc)
        shapes, claimed = doc["shapes"], doc["totals"]["bytes"]
        other = doc["model"].get("other_bytes")
        other = model["other_bytes"] if other is None else other
        if set(shapes) != set(formats):
            raise BitallocError("TARGET", f"{where}: the config's layers and shapes name different layers")
        if len(formats) != model["quantized_layers"]:
            raise BitallocError("TARGET", f"{where}: the config sets {len(formats)} layers, the search chose "
                                          f"{model['quantized_layers']}")
        counted = other + sum(weight_bytes(*map(int, shapes[name]), fmt) for name, fmt in formats.items())
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BitallocError("TARGET", f"{where}: the config is incomplete (layers, shapes, totals); rerun the job"
                            ) from None
    if counted != claimed:
        raise BitallocError("TARGET", f"{where}: the config claims {claimed} bytes but its layers' formats come to "
                                      f"{counted}; it was edited or damaged")
    return doc


def _pick(front: dict, avg_bits: Optional[float], budget: Optional[str], point: Optional[int]) -> dict:
    """The front row a selector names: the lowest-loss measured config within a budget, or mixed point N."""
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
    _check_front(front, str(run_dir))
    row = _pick(front, avg_bits, budget, point)
    doc = configio.read(run_dir / row["config"], configio.CONFIG_SCHEMA)
    return Chosen(verified(doc, front["model"], str(run_dir / row["config"])), row, str(run_dir))


def from_run(run_id: str, uri: str, avg_bits, budget, point) -> Chosen:
    """A job's parent run (pick from its front) or one point's child run (its config)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from bitalloc.dashboards.tracking import KIND_TAG, PARENT_TAG, client

    try:
        run = client(uri).get_run(run_id)
    except MlflowException:
        raise BitallocError("TARGET", f"no MLflow run {run_id} in {uri}") from None
    kind = run.data.tags.get(KIND_TAG)
    with tempfile.TemporaryDirectory() as tmp:
        def fetch(path: str, rid: str = run_id) -> Path:
            try:
                return Path(download_artifacts(run_id=rid, artifact_path=path, dst_path=f"{tmp}/{rid}",
                                               tracking_uri=uri))
            except (MlflowException, OSError):
                raise BitallocError("TARGET", f"MLflow run {run_id} has no front (no {path}; did the job finish?)"
                                    ) from None

        if kind in ("mixed", "uniform"):
            if any(x is not None for x in (avg_bits, budget, point)):
                raise BitallocError("--avg-bits/--budget/--point", f"run {run_id} is one front point; "
                                                                   f"give its job's run to choose among points")
            name = run.data.tags["bitalloc.config"]
            doc = configio.read(fetch(f"config/{Path(name).name}"), configio.CONFIG_SCHEMA)
            front = configio.read(fetch("results/front.json", run.data.tags.get(PARENT_TAG, "")),
                                  configio.FRONT_SCHEMA)
            _check_front(front, f"run {run_id}")
            return Chosen(verified(doc, front["model"], f"run {run_id}"), None, f"run {run_id}")
        if kind != "job":
            raise BitallocError("TARGET", f"MLflow run {run_id} is not a bitalloc job or front point")
        front = configio.read(fetch("results/front.json"), configio.FRONT_SCHEMA)
        _check_front(front, f"run {run_id}")
        row = _pick(front, avg_bits, budget, point)
        doc = configio.read(fetch(f"results/{row['config']}"), configio.CONFIG_SCHEMA)
    return Chosen(verified(doc, front["model"], f"run {run_id}"), row, f"run {run_id}")


def choose(target: str, avg_bits, budget, point, tracking_uri: Optional[str]) -> Chosen:
    """The config one selector names (a point's run needs none), from a result folder or an MLflow run, verified
    (see `verified`)."""
    if avg_bits is not None and not (math.isfinite(avg_bits) and avg_bits > 0):
        raise BitallocError("--avg-bits", f"{avg_bits} is not a positive number of bits")
    path = Path(target)
    if path.is_dir():
        return from_dir(path, avg_bits, budget, point)
    if _RUN_ID.match(target):
        from bitalloc.dashboards.tracking import resolve_uri

        uri = resolve_uri(tracking_uri)
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise BitallocError("TARGET", f"no MLflow store at {uri} to find run {target} in; give --tracking-uri")
        return from_run(target, uri, avg_bits, budget, point)
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
