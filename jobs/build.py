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


def build(target: str, avg_bits, budget, point, runtime_name: str, output: Path, force: bool,
          tracking_uri: Optional[str], console: Console) -> Built:
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
        runtime.check_buildable(picked.config)
        check_disk(output, picked.point.bytes + SLACK)
        card = model_card(picked)
        staging = (output.parent / f".{output.name}.partial" if runtime.artifact == "file" else staging_dir(output))
        _remove(staging)
        try:
            with Stages(console) as stages:
                details = runtime.build(picked, card, staging, stages)
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
