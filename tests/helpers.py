"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import pytest

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
