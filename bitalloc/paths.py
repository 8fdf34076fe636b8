"""Where bitalloc keeps files: the cache (level store, sensitivity tables, llama.cpp's build) and the staging folder
a result is written into before it is moved into place, so an interrupted writer leaves nothing half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$BITALLOC_CACHE/PARTS` (default `~/.cache/bitalloc/PARTS`)."""
    return Path(os.environ.get("BITALLOC_CACHE") or Path.home() / ".cache" / "bitalloc").joinpath(*parts)


def staging_dir(out: Path) -> Path:
    """The folder OUT is written into before it is published."""
    return out.parent / f".{out.name}.partial"


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging folder into place, replacing an earlier OUT (kept aside until the move is done)."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
