"""`bitalloc export`: pick one measured config of a job (a result dir or an MLflow run) and write it
in a runtime's format (`bitalloc.runtimes`), checked by that runtime's own parser where it is installed."""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.formats import shape_bytes
from bitalloc.results import ConfigDoc, Front, ModelInfo, Point, read_config, read_front
from bitalloc.runtimes import RUNTIMES, get_runtime, layers_of
from bitalloc.runtimes import venv as runtime_code
from bitalloc.units import parse_bytes

CANONICAL = ("json", "yaml")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def export_formats() -> list[str]:
    """The canonical formats and every runtime that reads a recipe file."""
    return list(CANONICAL) + sorted(name for name, cls in RUNTIMES.items() if cls.export_file)


def resolve_export_format(export_format: Optional[str], output: Path) -> str:
    """The export format: as given, else json/yaml by the output's suffix; unknown names are refused."""
    if export_format is None:
        export_format = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(output.suffix)
        if export_format is None:
            raise BitallocError("--format", f"cannot tell the format from {output.name!r}; give --format "
                                            f"({', '.join(export_formats())})")
    if export_format not in export_formats():
        raise BitallocError("--format", f"{export_format!r} is not an export format; allowed: "
                                        f"{', '.join(export_formats())}")
    return export_format


@dataclass
class Chosen:
    """One measured config and where it came from (a result folder or an MLflow run)."""

    config: ConfigDoc
    where: str
    data_hash: Optional[str] = None  # the job's token sets: keys the level store, where the levels' companions are


def check_front(front: Front, where: str) -> None:
    if not front.mixed:
        raise BitallocError("TARGET", f"{where}: front.json has no measured points")


def verified(doc: ConfigDoc, model: ModelInfo, where: str) -> ConfigDoc:
    """A config whose claims hold: every layer of the search has a format and a shape, and the bytes recount
    from those shapes (plus the model's other tensors) to exactly the total it claims."""
    try:
        formats = doc.formats()
    except BitallocError as exc:
        raise BitallocError("TARGET", f"{where}: {exc.field}: {exc.message}") from None
    other = model.other_bytes if doc.model.other_bytes is None else doc.model.other_bytes
    if set(doc.shapes) != set(formats):
        raise BitallocError("TARGET", f"{where}: the config's layers and shapes name different layers")
    if len(formats) != model.quantized_layers:
        raise BitallocError("TARGET", f"{where}: the config sets {len(formats)} layers, the search chose "
                                      f"{model.quantized_layers}")
    try:
        counted = other + sum(shape_bytes(doc.shapes[name], fmt) for name, fmt in formats.items())
    except (TypeError, ValueError):
        raise BitallocError("TARGET", f"{where}: the config's shapes are not [out, in] or [experts, out, in]; rerun the job") from None
    if counted != doc.totals.bytes:
        raise BitallocError("TARGET", f"{where}: the config claims {doc.totals.bytes} bytes but its layers' formats "
                                      f"come to {counted}; it was edited or damaged")
    return doc


def pick_point(front: Front, avg_bits: Optional[float], budget: Optional[str], point: Optional[int],
               available: Optional[set[str]] = None) -> Point:
    """The point a selector names: the lowest-loss measured config within a budget, or mixed point N; only among
    rows whose config file is `available` when given (a row without its file cannot be exported)."""
    if sum(x is not None for x in (avg_bits, budget, point)) != 1:
        raise BitallocError("--avg-bits/--budget/--point", "give exactly one of them")
    mixed = front.mixed
    if point is not None:
        if not 1 <= point <= len(mixed):
            raise BitallocError("--point", f"{point} is not on the front; points are numbered 1 to {len(mixed)}")
        chosen = mixed[point - 1]
        if available is not None and chosen.config not in available:
            raise BitallocError("--point", f"{chosen.label}: its config file {chosen.config} is missing")
        return chosen
    if budget is not None:
        limit, field = parse_bytes(budget, "--budget"), "--budget"
    else:
        limit, field = front.bytes_at_avg_bits(avg_bits), "--avg-bits"
    fitting = [p for p in front.points if p.bytes <= limit and (available is None or p.config in available)]
    if not fitting:
        smallest = min(front.points, key=lambda p: p.bytes)
        raise BitallocError(field, f"no measured config fits; the smallest is {smallest.bytes} bytes "
                                   f"({smallest.mib:.2f} MiB, {smallest.avg_bits:.3f} avg bits)")
    return min(fitting, key=lambda p: (p.loss, p.bytes))


def config_file(folder: Path, relative: str) -> Path:
    """A config file of a result folder: a regular file inside it, reached through no symlink."""
    path = folder
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            raise BitallocError(str(folder / "front.json"), f"{relative!r} goes through a symlink ({path}); a job "
                                                            f"writes its configs into its own folder")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BitallocError(str(folder / "front.json"), f"{relative!r} leaves the result folder")
    return path


def check_row(point: Point, doc: ConfigDoc, front: Front, where: str) -> None:
    """A front row says what its config file says: its bytes, average bits and measurement, finite, on this model."""
    row = f"{where}: row {point.label!r}"
    if not (math.isfinite(point.loss) and math.isfinite(point.quality)):
        raise BitallocError("TARGET", f"{row} has a loss or quality that is not a number; rerun the job")
    if doc.model.content_hash != front.model.content_hash:
        raise BitallocError("TARGET", f"{row}: its config is of another model (content hash differs)")
    if doc.totals.bytes != point.bytes or abs(doc.totals.avg_bits - point.avg_bits) > 1e-6:
        raise BitallocError("TARGET", f"{row} claims {point.bytes} bytes ({point.avg_bits:g} avg bits), its config "
                                      f"{doc.totals.bytes} ({doc.totals.avg_bits:g}); it was edited or damaged")
    measured = doc.measured()
    close = lambda a, b: abs(a - b) <= 1e-9 * max(1.0, abs(b))  # noqa: E731  (both written from one float)
    if measured is None or not (close(point.loss, measured[0]) and close(point.quality, measured[1])):
        raise BitallocError("TARGET", f"{row} claims loss {point.loss:g}, its config "
                                      f"{'nothing' if measured is None else f'{measured[0]:g}'}; it was edited or "
                                      f"damaged")


def read_results(folder: Path) -> tuple[Front, dict[str, ConfigDoc]]:
    """A job's front with every row checked against the config file it names (`verified`, `check_row`), each file
    named once and inside the folder: a point is chosen only among rows whose claims hold (see `pick_point`'s
    `available`: the configs returned)."""
    if not (folder / "front.json").is_file():
        raise BitallocError("TARGET", f"{str(folder)!r} holds no front.json; give a job's output dir or run id")
    front = read_front(folder / "front.json")
    check_front(front, str(folder))
    if front.digest and front.digest.get("front") != front.content_sha256():
        raise BitallocError(str(folder / "front.json"), "was changed after the job wrote it (its digest differs); "
                                                        "rerun the job")
    configs: dict[str, ConfigDoc] = {}
    for p in front.points:
        if p.config in configs:
            raise BitallocError(str(folder / "front.json"), f"two rows name {p.config!r}; it was edited or damaged")
        path = config_file(folder, p.config)
        if not path.exists():
            continue  # a row without its file can never be chosen (pick_point's `available`)
        doc = verified(read_config(path), front.model, str(path))
        if front.digest and front.digest.get(p.config) != hashlib.sha256(path.read_bytes()).hexdigest():
            raise BitallocError(str(path), "was changed after the job wrote it (its digest differs); rerun the job")
        check_row(p, doc, front, str(folder / "front.json"))
        configs[p.config] = doc
    return front, configs


def from_dir(run_dir: Path, avg_bits, budget, point) -> Chosen:
    front, configs = read_results(run_dir)
    return Chosen(configs[pick_point(front, avg_bits, budget, point, set(configs)).config], str(run_dir),
                  front.data.hash)


def from_run(run_id: str, uri: str, avg_bits, budget, point) -> Chosen:
    """A job's parent run (pick from its front) or one point's child run (its config)."""
    from bitalloc.dashboards.tracking import KIND_TAG, PARENT_TAG, fetch_artifact, get_run

    run = get_run(run_id, uri)
    kind = run.data.tags.get(KIND_TAG)
    with tempfile.TemporaryDirectory() as tmp:
        def fetch(path: str, rid: str = run_id) -> Path:
            return fetch_artifact(rid, path, Path(tmp) / rid, uri,
                                  f"MLflow run {run_id} has no front (no {path}; did the job finish?)")

        if kind in ("mixed", "uniform"):
            if any(x is not None for x in (avg_bits, budget, point)):
                raise BitallocError("--avg-bits/--budget/--point", f"run {run_id} is one front point; "
                                                                   f"give its job's run to choose among points")
            doc = read_config(fetch(f"config/{Path(run.data.tags['bitalloc.config']).name}"))
            front = read_front(fetch("results/front.json", run.data.tags.get(PARENT_TAG, "")))
            return Chosen(verified(doc, front.model, f"run {run_id}"), f"run {run_id}", front.data.hash)
        if kind != "job":
            raise BitallocError("TARGET", f"MLflow run {run_id} is not a bitalloc job or front point")
        chosen = from_dir(fetch("results"), avg_bits, budget, point)
    return Chosen(chosen.config, f"run {run_id}", chosen.data_hash)


MAX_AVG_BITS = 32  # no weight is stored in more than float32's bits


def check_avg_bits(avg_bits: Optional[float]) -> None:
    if avg_bits is not None and not (math.isfinite(avg_bits) and 0 < avg_bits <= MAX_AVG_BITS):
        raise BitallocError("--avg-bits", f"{avg_bits} is not a number of bits from 0 to {MAX_AVG_BITS}")


def run_store(target: str, tracking_uri: Optional[str]) -> str:
    """The MLflow store to find run TARGET in; an MLflow run id is required (a sqlite store that is not there is
    refused: opening it would create an empty one)."""
    if not _RUN_ID.match(target):
        raise BitallocError("TARGET", f"{target!r} is neither a job's output dir nor an MLflow run id (32 hex digits)")
    from bitalloc.dashboards.tracking import existing_store

    return existing_store(tracking_uri, target)


def choose(target: str, avg_bits, budget, point, tracking_uri: Optional[str]) -> Chosen:
    """The config one selector names (a point's run needs none), from a result folder or an MLflow run, verified
    (see `verified`)."""
    check_avg_bits(avg_bits)
    path = Path(target)
    if path.is_dir():
        return from_dir(path, avg_bits, budget, point)
    return from_run(target, run_store(target, tracking_uri), avg_bits, budget, point)


def check_new_file(output: Path, force: bool, field: str = "--output") -> None:
    """Refuse, before any work, an output that is a folder, one that exists (unless `force`), or one whose folder does
    not exist or cannot be written: an export never replaces a file or makes folders unasked."""
    if output.is_dir():
        raise BitallocError(field, f"{str(output)!r} is a folder; give a file path")
    if output.exists() and not force:
        raise BitallocError(field, f"{str(output)!r} exists; pass --force to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise BitallocError(field, f"the folder {str(parent)!r} does not exist; create it first")
    configio.check_writable(output, field)


def write_export(chosen: Chosen, export_format: str, output: Path, nearest: bool) -> tuple[list[str], str, list[str]]:
    """Write the file atomically (for llama.cpp levels made with an importance matrix, the matrix beside it); returns
    (layers written as nearest, what the runtime's parser said, notes: levels another quantizer made, the matrix)."""
    fmt = resolve_export_format(export_format, output)
    if fmt in CANONICAL:
        if output.suffix not in ({".json"} if fmt == "json" else {".yaml", ".yml"}):
            raise BitallocError("--output", f"{output.name!r} must end in .{fmt} for --format {fmt}")
        configio.write(chosen.config.document(), output)
        return [], f"canonical {chosen.config.schema_}", []
    layers, quantizers, runtime = layers_of(chosen.config), chosen.config.quantizers, get_runtime(fmt, "--format")
    text, changed = runtime.export(layers, chosen.config.model.type, nearest, quantizers)
    matrix, said = importance_matrix(chosen, output) if fmt == "llamacpp" else (None, [])
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        staged.write_text(text)
        if matrix:
            shutil.copyfile(matrix, Path(tmp) / "imatrix")
        checked = f"not checked: {runtime.library} is not installed here"
        if runtime_code.available(fmt):
            try:
                checked = runtime_code.check(fmt, str(staged), None if changed else chosen.config.document())
            except Exception as exc:
                raise BitallocError("--format", f"{fmt} rejected the export: {exc}") from None
        staged.replace(output)
        if matrix:
            (Path(tmp) / "imatrix").replace(imatrix_path(output))
    return changed, checked, runtime.notes(layers) + said


def imatrix_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.imatrix.gguf")


def importance_matrix(chosen: Chosen, output: Path) -> tuple[Optional[Path], list[str]]:
    """For llama.cpp levels made with an importance matrix: the job's matrix in this machine's level store (written
    beside the export: llama-quantize makes other levels without it), and what to tell the user."""
    import torch

    from bitalloc.quantizers import Calibration, get_quantizer
    from bitalloc.quantizers.gguf.files import imatrix_file
    from bitalloc.quantizers.store import LevelStore

    params = chosen.config.quantizers.get("gguf", {})
    if not params.get("imatrix"):
        return None, []
    store = LevelStore(chosen.config.model.content_hash, get_quantizer("gguf", **params),
                       calibration=Calibration(torch.empty(0), chosen.data_hash or ""))
    found = imatrix_file(store.folder)
    if chosen.data_hash and found.is_file():
        return found, [f"the levels were made with the job's importance matrix, written to {imatrix_path(output)}: "
                       f"pass it to llama-quantize with --imatrix, or it makes other levels"]
    return None, ["the levels were made with an importance matrix (llama-imatrix over the job's calibration text) "
                  "that this machine's level store does not hold: run the job here to make it, and export again; "
                  "llama-quantize without it makes other levels"]
