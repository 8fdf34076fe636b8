"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

from bitalloc.quantizers.store import Levels, open_stores


def filled_levels(model, layers, formats, quantizers=None, calibration=None, **kwargs) -> Levels:
    """A job's levels for these layers and formats: each method's store filled (defaults unless given), then opened."""
    formats = tuple(formats)
    stores = open_stores(model.content_hash(), formats, quantizers, calibration)
    for store in stores.values():
        store.fill(model, layers, formats)
    return Levels(model, layers, formats, stores, **kwargs)
