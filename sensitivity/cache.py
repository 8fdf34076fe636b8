"""Sensitivity tables stored as files and reused by later jobs.

Key: model content hash, the estimator, its version and its declared parameters, the formats and
layers, and — only where the estimator uses them — the calibration data hash, the seed and (for the estimators that
measure configs through a backend other than torch's) the evaluator. Location:
$BITALLOC_CACHE/sensitivity/ (default ~/.cache/bitalloc/sensitivity/). Files are JSON; floats
round-trip exactly, so a cached table is identical to the one computed.
"""

from __future__ import annotations

import hashlib
import json

from pathlib import Path

from bitalloc import configio
from bitalloc.formats import Format
from bitalloc.paths import cache_dir
from bitalloc.types import SensitivityTable

SCHEMA = "bitalloc.sensitivity/1"


def table_key(estimator, model_hash: str, formats, layers, data_hash: str, seed: int,
              quantizers: dict | None = None, evaluator: str = "torch") -> str:
    """`quantizers`: each method's level-store key (name, version, parameters, calibration data): the levels a
    table measures; `evaluator`: whose arithmetic measured it, keyed where an estimator measures configs and it is
    not torch's."""
    body = {
        "quantizers": quantizers or {},
        "model": model_hash,
        "estimator": estimator.name,
        "version": estimator.version,
        "params": estimator.params(),
        "formats": [f.to_dict() for f in formats],
        "layers": [layer.name for layer in layers],
        "data": data_hash if estimator.uses_data else None,
        "seed": seed if estimator.random else None,
    }
    if estimator.measures_calibration and evaluator != "torch":
        body["evaluator"] = evaluator
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def table_document(table: SensitivityTable) -> dict:
    return {
        "schema": SCHEMA,
        "estimator": table.estimator,
        "version": table.version,
        "params": table.params,
        "data_hash": table.data_hash,
        "wall_time_s": table.wall_time_s,
        "peak_rss_bytes": table.peak_rss_bytes,
        "layers": list(table.layers),
        "formats": [f.to_dict() for f in table.formats],
        "values": table.values.tolist(),
        "uncertainty": table.uncertainty.tolist() if table.uncertainty is not None else None,
    }


def table_from_document(doc: dict) -> SensitivityTable:
    return SensitivityTable(
        layers=tuple(doc["layers"]),
        formats=tuple(Format.from_dict(f) for f in doc["formats"]),
        values=doc["values"],
        estimator=doc["estimator"],
        params=doc["params"],
        version=doc.get("version", 1),
        data_hash=doc["data_hash"],
        wall_time_s=doc["wall_time_s"],
        uncertainty=doc["uncertainty"],
        peak_rss_bytes=doc["peak_rss_bytes"],
    )


def path_for(key: str, estimator_name: str) -> Path:
    return cache_dir("sensitivity") / f"{estimator_name}-{key}.json"


def load(path: Path) -> SensitivityTable | None:
    if not path.is_file():
        return None
    return table_from_document(configio.read(path, SCHEMA))


def save(table: SensitivityTable, path: Path) -> None:
    configio.write(table_document(table), path)
