"""Config and front files: canonical JSON (sorted keys, 2-space indent) or YAML, with a schema version.

A config file (`bitalloc.config/1`):
  schema, bitalloc_version, job_spec_hash,
  model: {source, content_hash, type},         (type: the transformers model_type, e.g. llama)
  layers: {module name: {bits, group_size, symmetric, scale_dtype}},
  shapes: {module name: [out_features, in_features]},
  totals: {bytes, mib, avg_bits},
  metrics: {predicted, kl, ppl, tokens}   (kl/ppl/tokens absent if not measured)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from . import __version__
from .errors import BitallocError
from .formats import Format
from .types import BitConfig, Measurement
from .units import mib

CONFIG_SCHEMA = "bitalloc.config/1"
FRONT_SCHEMA = "bitalloc.front/1"


def config_document(
    config: BitConfig, *, model_source: str, model_hash: str, spec_hash: str, measurement: Measurement | None,
    model_type: str | None = None, shapes: dict[str, list[int]] | None = None,
) -> dict:
    metrics = {"predicted": config.predicted}
    if measurement is not None:
        metrics.update(kl=measurement.kl, ppl=measurement.ppl, tokens=measurement.tokens)
    return {
        "schema": CONFIG_SCHEMA,
        "bitalloc_version": __version__,
        "job_spec_hash": spec_hash,
        "model": {"source": model_source, "content_hash": model_hash, "type": model_type},
        "layers": {name: fmt.to_dict() for name, fmt in config.assignment().items()},
        "shapes": shapes or {},
        "totals": {"bytes": config.bytes, "mib": round(mib(config.bytes), 6), "avg_bits": round(config.avg_bits, 6)},
        "metrics": metrics,
    }


def dumps(doc: dict, suffix: str = ".json") -> str:
    if suffix in (".yaml", ".yml"):
        return yaml.safe_dump(doc, sort_keys=True)
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def write(doc: dict, path: Path) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(dumps(doc, path.suffix))
    os.replace(tmp, path)


def read(path: Path, schema: str) -> dict:
    try:
        text = path.read_text()
    except OSError:
        raise BitallocError(str(path), "cannot be read") from None
    try:
        doc = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        raise BitallocError(str(path), "is not valid JSON/YAML") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise BitallocError(str(path), f"is not a {schema} file")
    return doc


def config_formats(doc: dict) -> dict[str, Format]:
    return {name: Format.from_dict(spec, f"layers.{name}") for name, spec in doc["layers"].items()}
