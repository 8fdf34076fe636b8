"""`bitalloc build`: the artifact a runtime serves for one measured point, written from the job's level store — the
levels the front measured, never quantized again — with every other tensor as the front counted it and a model
card (`card.py`). Each runtime's `build` writes its own on-disk form; this module picks the point, refuses what
cannot be written before any work, and writes into a staging path renamed when complete, so an interrupted build
leaves nothing behind and an earlier artifact is replaced only by a finished one (`--force`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.paths import publish, staging_dir
from bitalloc.progress import Stages
from bitalloc.runtimes import RUNTIMES, get_runtime

from .card import model_card
from .export import check_avg_bits
from .verify import Picked, job_folder, pick

SLACK = 16 * 2**20  # beyond the point's bytes: tokenizer, configs, the card


@dataclass
class Built:
    picked: Picked
    runtime: str
    output: Path
    bytes: int  # the artifact's bytes on disk
    counted: int  # the point's bytes as the front counted them
    card_bytes: int  # what the model card adds to a file (0 for a folder: its README.md is counted in `bytes`)
    details: dict
    seconds: float


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def builders() -> list[str]:
    return sorted(n for n, cls in RUNTIMES.items() if cls.artifact)


def check_output(runtime, output: Path, force: bool) -> None:
    """Refuse, before any work, an output of the wrong kind, an existing one without --force, or an unwritable one."""
    if runtime.artifact == "file":
        if output.suffix != runtime.artifact_suffix:
            raise BitallocError("--output", f"{runtime.name}'s artifact is one {runtime.artifact_suffix} file; give "
                                            f"a path ending in {runtime.artifact_suffix}")
        if output.is_dir():
            raise BitallocError("--output", f"{str(output)!r} is a folder; give a file path")
    elif output.exists() and not output.is_dir():
        raise BitallocError("--output", f"{runtime.name}'s artifact is a folder and {str(output)!r} is a file")
    if output.exists() and not force:
        raise BitallocError("--output", f"{str(output)!r} exists; pass --force to replace it")
    configio.check_writable(output, "--output")


def check_disk(output: Path, needed: int) -> None:
    where = Path(output).absolute().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise BitallocError("--output", f"the artifact takes about {needed / 2**20:.0f} MiB and {where} has "
                                        f"{free / 2**20:.0f} MiB free")


def nearest_point(runtime, picked: Picked) -> tuple[Picked, list[str]]:
    """The point as the runtime stores its nearest (`build --nearest`): each layer whose level its artifact cannot
    hold as measured at the format the runtime writes for it (its export's placement), made by the runtime's own
    quantizer on the job's calibration data when the artifact is written (the job's spec, its formats those of this
    point); every other layer as measured. One line per changed layer."""
    from dataclasses import asdict

    from bitalloc.results import FormatDoc
    from bitalloc.runtimes import layers_of

    from .spec import FormatsSpec

    doc = picked.config
    layers = layers_of(doc)
    stored, _ = runtime.without_embeddings(layers)
    placed = runtime.place(stored, doc.model.type)
    formats, changed = {}, []
    for l in layers:
        fmt = l.fmt
        if fmt.quantized and (l.name not in placed or runtime.unstored(l, placed[l.name])):
            fmt = runtime.format_of(placed[l.name].value if l.name in placed else None)
            changed.append(f"{l.name}: {l.fmt.name} -> {fmt.name}")
        formats[l.name] = fmt
    params = {part.resolved_method(): part.params for part in picked.spec.formats}
    parts = []
    for f in sorted(set(formats.values())):
        if f.ggml:
            parts.append(FormatsSpec(method="gguf", types=[f.ggml], params=params.get("gguf", {})))
        else:
            parts.append(FormatsSpec(method=f.method, bits=[f.bits], group_size=f.group_size or 64,
                                     symmetric=f.symmetric, scale_dtype=f.scale_dtype,
                                     params=params.get(f.method, {}) if f.quantized else {}))
    embedded = runtime.embeddings and bool(doc.embeddings)  # searched where the runtime stores it, as the job did
    spec = picked.spec.model_copy(update={"formats": parts,
                                          "model": picked.spec.model.model_copy(update={"embeddings": embedded})})
    config = doc.model_copy(update={"layers": {n: FormatDoc(**asdict(f)) for n, f in formats.items()},
                                    "quantizers": {m: q.params() for m, q in spec.quantizers().items()}})
    return Picked(picked.folder, picked.front, picked.point, config, spec), changed


def build(target: str, avg_bits, budget, point, runtime_name: str, output: Path, force: bool,
          tracking_uri: Optional[str], console: Console, nearest: bool = False) -> Built:
    runtime = get_runtime(runtime_name)
    if not runtime.artifact:
        raise BitallocError("--runtime", f"build writes {', '.join(builders())} artifacts; {runtime_name}'s is not "
                                         f"written yet: export its recipe (bitalloc export ... --format "
                                         f"{runtime_name}) for {runtime_name} to quantize the model itself")
    check_avg_bits(avg_bits)
    check_output(runtime, output, force)
    start = time.perf_counter()
    with job_folder(target, tracking_uri) as folder:
        picked = pick(folder, avg_bits, budget, point)
        changed: list[str] = []
        try:
            runtime.check_buildable(picked.config)
        except BitallocError:
            if not nearest:
                raise
            picked, changed = nearest_point(runtime, picked)
            runtime.check_buildable(picked.config)
        check_disk(output, picked.point.bytes + SLACK)
        card = model_card(picked, changed)
        staging = (output.parent / f".{output.name}.partial" if runtime.artifact == "file" else staging_dir(output))
        _remove(staging)
        try:
            with Stages(console) as stages:
                details = runtime.build(picked, card, staging, stages)
            if changed:
                details["nearest_layers"] = len(changed)
            if runtime.artifact == "file":
                output.parent.mkdir(parents=True, exist_ok=True)
                staging.replace(output)
            else:
                publish(staging, output)
        finally:
            _remove(staging)
    size = output.stat().st_size if output.is_file() else sum(f.stat().st_size for f in output.rglob("*")
                                                                if f.is_file())
    return Built(picked, runtime_name, output, size, picked.point.bytes, int(details.pop("card_bytes", 0)), details,
                 time.perf_counter() - start)
