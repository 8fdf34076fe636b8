"""`bitalloc verify`: build a measured point the way its runtime builds it from the exported file, with the runtime's
own code (each runtime's `verify`, `bitalloc.runtimes`), run it on the job's held-out tokens, and put what it gives
(loss, quality, the bytes its file stores) beside what the front promised. Results go into front.json
(`runtime_points`), the front plot, and the job's MLflow run (a child run per runtime and point).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from rich.console import Console

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.progress import Stages
from bitalloc.results import ConfigDoc, Front, Point, RuntimePoint, read_config
from bitalloc.runtimes import Runtime, get_runtime, layers_of

from .export import check_avg_bits, pick_point, read_results, run_store

if TYPE_CHECKING:
    from .spec import JobSpec


@dataclass
class Picked:
    """The point to verify, its config, and the job it belongs to."""

    folder: Path
    front: Front
    point: Point
    config: ConfigDoc
    spec: "JobSpec"  # the job's spec, as it ran


@contextmanager
def job_folder(target: str, tracking_uri: Optional[str]) -> Iterator[Path]:
    """The job's result folder: TARGET itself, or its MLflow run's `results` artifacts fetched to a temporary one."""
    path = Path(target)
    if path.is_dir():
        if not (path / "front.json").is_file():
            raise BitallocError("TARGET", f"{target!r} holds no front.json; give a job's output dir or run id")
        yield path
        return
    uri = run_store(target, tracking_uri)
    from bitalloc.dashboards.tracking import KIND_TAG, fetch_artifact, get_run

    run = get_run(target, uri)
    if run.data.tags.get(KIND_TAG) != "job":
        raise BitallocError("TARGET", f"MLflow run {target} is not a bitalloc job's run; give the job's run id")
    with tempfile.TemporaryDirectory(prefix="bitalloc-verify-") as tmp:
        yield fetch_artifact(target, "results", Path(tmp), uri, f"MLflow run {target} has no results (did the job "
                                                                f"finish?)")


def pick(folder: Path, avg_bits, budget, point) -> Picked:
    front, configs = read_results(folder)
    chosen = pick_point(front, avg_bits, budget, point, set(configs))
    doc = configs[chosen.config]
    if not (folder / "spec.yaml").is_file():
        raise BitallocError("TARGET", f"{folder} has no spec.yaml (an older result); rerun the job to verify it")
    from .spec import load_spec

    return Picked(folder, front, chosen, doc, load_spec(folder / "spec.yaml"))


def exported(runtime: Runtime, picked: Picked, nearest: bool) -> tuple[str, int]:
    """The runtime's file for the point, and how many layers it writes only as the nearest it can express; without
    `nearest` such a point is refused (the runtime would build another model than the one measured). A runtime
    without a recipe file (bitalloc's own) builds from the config itself."""
    if not runtime.export_file:
        return "", 0
    layers = layers_of(picked.config)
    text, changed = runtime.export(layers, picked.config.model.type, nearest=True, quantizers=picked.config.quantizers)
    if changed and not nearest:
        raise BitallocError("--runtime", f"{runtime.name} cannot build {len(changed)} of {len(layers)} layers of this "
                                         f"point as searched, e.g. {changed[0]}; verify a point of a job searched "
                                         f"with formats.target: {runtime.name}, or pass --nearest to measure what "
                                         f"the nearest export builds")
    runtime.prepare()
    return text, len(changed)


def record(picked: Picked, points: list[RuntimePoint], console: Console) -> None:
    """Into front.json (a point verified again replaces its earlier record), the front plot, and MLflow."""
    front = picked.front
    kept = [r for r in front.runtime_points if (r.runtime, r.label) not in {(p.runtime, p.label) for p in points}]
    front.runtime_points = kept + points
    configio.write(front.document(), picked.folder / "front.json")  # a run's results: fetched, then logged back
    plots = picked.folder / "plots"
    if plots.is_dir():
        from bitalloc.dashboards.plots import dashboard_html, front_png
        from bitalloc.sensitivity.cache import load

        front_png(front, plots / "front.png")
        table = load(picked.folder / "sensitivity.json")
        if table is not None:
            configs = {p.config: read_config(picked.folder / p.config) for p in front.points}
            (plots / "dashboard.html").write_text(dashboard_html(front, table, configs))
    if front.tracking is not None:
        from bitalloc.dashboards.tracking import log_runtime_points

        log_runtime_points(front, points, picked.folder, console)


def verify(target: str, avg_bits, budget, point, runtime_name: str, presets: bool, nearest: bool,
           tracking_uri: Optional[str], console: Console, recipe: bool = False) -> tuple[Picked, list[RuntimePoint]]:
    runtime = get_runtime(runtime_name)
    if presets and not runtime.presets:
        raise BitallocError("--presets", f"presets are llama.cpp's; {runtime_name} has none")
    if recipe and not runtime.builds:
        raise BitallocError("--recipe", f"{runtime_name} has no quantizer of its own that verify runs; --recipe is "
                                        f"for the Python runtimes (gptqmodel, hqq, llmcompressor)")
    check_avg_bits(avg_bits)
    from .runner import open_workspace

    with job_folder(target, tracking_uri) as folder:
        picked = pick(folder, avg_bits, budget, point)
        text, rewritten = exported(runtime, picked, nearest)
        with Stages(console) as stages, \
                tempfile.TemporaryDirectory(prefix=f"bitalloc-verify-{runtime_name}-") as work:
            ws = open_workspace(picked.spec, stages)
            points = runtime.verify(ws, picked, text, Path(work), presets, stages, recipe=recipe or bool(rewritten))
        for p in points:
            if p.kind == "point" and rewritten:
                p.details["nearest_layers"] = float(rewritten)
                p.label = f"{p.label} (nearest)"
        record(picked, points, console)
    return picked, points
