"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from bitalloc.quantizers.store import Levels, open_stores


def filled_levels(model, layers, formats, quantizers=None, calibration=None, **kwargs) -> Levels:
    """A job's levels for these layers and formats: each method's store filled (defaults unless given), then opened."""
    formats = tuple(formats)
    stores = open_stores(model.content_hash(), formats, quantizers, calibration)
    for store in stores.values():
        store.fill(model, layers, formats)
    return Levels(model, layers, formats, stores, **kwargs)


def one_line_error(capsys, argv) -> str:
    """What the CLI says on stderr for argv: one line, exit code 2, no traceback."""
    from bitalloc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def python_runtime_job(tiny_smollm, text_dir, root: Path, target: str, method: str | None = None,
                       params: dict | None = None, budget: float = 5.0) -> Path:
    """A one-point job searched with `formats.target` a Python runtime (skipped without the runtimes' environment)."""
    from bitalloc.cli import main
    from bitalloc.runtimes.python import ROOT
    from conftest import tiny_job

    if not (os.environ.get("BITALLOC_RUNTIMES_PYTHON") or (ROOT / ".venv-runtimes" / "bin" / "python").exists()):
        pytest.skip("no .venv-runtimes (`./dev test` builds it): the Python runtimes are not installed")
    out = root / "out"
    spec = tiny_job(tiny_smollm, text_dir, out, data={"seq_len": 64, "calibration": 2, "evaluation": 4},
                    search={"budgets": [budget], "points": 1})
    spec.update(formats={"target": target, **({"method": method} if method else {}),
                         **({"params": params} if params else {})}, tracking={"enabled": False})
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(root / "job.yaml")])
    return out
