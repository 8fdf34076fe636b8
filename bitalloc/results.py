"""What a job hands its users, as typed documents: the front (`front.json`, `bitalloc.front/2`) and one config per
measured point (`bitalloc.config/1`). Plots, tracking, the table, export, pack and ui read these objects, never the
raw JSON; `bitalloc schema front|config` prints their JSON Schema, shipped in `bitalloc/schemas/`.

A front's rows are `Point`s, mixed and uniform alike (`kind`); `loss` and `quality` are the job's metric's
(`metric`: KL and perplexity for a causal LM). A `bitalloc.front/1` file (rows keyed by the metric's names,
uniform rows in their own list) is read into the same object.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__, configio
from .errors import BitallocError
from .formats import Format
from .metrics import METRICS, Metric
from .model import NEXT_TOKEN
from .types import BitConfig, Measurement
from .units import bytes_at_avg_bits, mib

FRONT_SCHEMA = "bitalloc.front/2"
FRONT_SCHEMA_V1 = "bitalloc.front/1"
CONFIG_SCHEMA = "bitalloc.config/1"
SCHEMA_DIR = Path(__file__).parent / "schemas"
Number = Union[int, float]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MetricDoc(_Doc):
    kind: str = NEXT_TOKEN
    loss: str = "kl"
    quality: str = "ppl"
    description: str = ""

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"{v!r} is not a metric; allowed: {', '.join(METRICS)}")
        return v

    @classmethod
    def of(cls, metric: Metric) -> "MetricDoc":
        return cls(kind=metric.kind, loss=metric.loss, quality=metric.quality, description=metric.description)

    def metric(self) -> Metric:
        return METRICS[self.kind]


class Point(_Doc):
    """One measured config: a mixed front point or a uniform baseline (`format` names its one weight format)."""

    kind: Literal["mixed", "uniform"]
    label: str
    format: Optional[str] = None
    avg_bits: float
    bytes: int
    mib: float
    predicted: float
    loss: float
    quality: float
    loss_error: Optional[float] = None  # with a float16 reference: a bound on |loss − loss against float32|
    config: str  # the config file, relative to the result folder

    @field_validator("config")
    @classmethod
    def _inside(cls, v: str) -> str:
        path = PurePosixPath(v)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"config path {v!r} leaves the result folder")
        return v


class JobInfo(_Doc):
    name: str
    seed: int
    spec_hash: str
    packages: dict[str, str] = {}


class ModelInfo(_Doc):
    source: str
    type: Optional[str] = None
    content_hash: str
    quantized_layers: int
    quantized_params: int
    other_bytes: int
    # whose bytes the points' are: None, bitalloc's count (each tensor at its format or dtype); a runtime's name,
    # the size of the file that runtime writes for the point (metadata, tokenizer and padding included)
    bytes_of: Optional[str] = None


class DataInfo(_Doc):
    hash: str
    calibration_tokens: int
    evaluation_tokens: int


class SensitivityInfo(_Doc):
    estimator: str
    version: int = 1
    params: dict = {}
    wall_time_s: float = 0.0
    peak_rss_bytes: Optional[int] = None
    cache_file: str = ""


class Evaluations(_Doc):
    screen: int = 0
    full: int = 0


class SolverInfo(_Doc):
    name: str
    bound: float = 0.0
    slack_bytes: int = 0
    front_size: int
    evaluations: Evaluations = Evaluations()
    wall_time_s: float = 0.0


class Reference(_Doc):
    """The unquantized model: its size and quality on the held-out tokens."""

    bytes: int
    mib: float
    quality: float
    tokens: int
    precision: Literal["float32", "float16"] = "float32"  # how its outputs are kept for the loss


class ProxyFront(_Doc):
    bytes: list[int] = []
    predicted: list[float] = []


class MemoryInfo(_Doc):
    level_store_bytes: int = 0  # the stored levels of the job's layers and formats (on disk, read on demand)
    working_set_bytes: int = 0  # the most dequantized weights an evaluating process keeps
    reference_bytes: int = 0
    quant_cache_bytes: Optional[int] = None  # fronts written before the level store: the all-in-memory cache


class EvaluationInfo(_Doc):
    """How the points were measured: counts, where, and whose arithmetic (`torch`: bitalloc's evaluator over every
    position of the held-out windows; `llamacpp`: llama.cpp's forward, positions n/2 … n−2 of each window, as
    llama-perplexity scores them)."""

    computed: int = 0
    from_checkpoint: int = 0
    where: str = ""
    evaluator: Literal["torch", "llamacpp"] = "torch"


class TrackingInfo(_Doc):
    uri: str
    experiment_id: str
    run_id: str


class RuntimePoint(_Doc):
    """A point as a runtime built it from the exported file (`bitalloc verify`), or one of the runtime's own presets
    (`kind: preset`, no bitalloc figures): the runtime's loss and quality on the job's held-out tokens, and the bytes
    its file stores for the searched layers next to the bytes bitalloc counted."""

    runtime: str
    kind: Literal["point", "preset"] = "point"
    label: str
    config: Optional[str] = None  # the front point's config file (kind point)
    bytes: int  # whole-model bytes as the front counts them: stored bytes of the searched layers + other bytes
    mib: float
    stored_layer_bytes: int  # what the runtime's file stores for the searched layers
    counted_layer_bytes: Optional[int] = None  # what bitalloc counted for them (kind point)
    file_bytes: int
    file_sha256: str
    loss: float  # as the runtime computes it on `tokens` (or bitalloc's evaluator on the runtime's weights)
    quality: float
    tokens: int
    bitalloc_loss: Optional[float] = None  # bitalloc's own measurement of the point on the same tokens
    details: dict[str, float] = {}

    @property
    def loss_rel_diff(self) -> Optional[float]:
        """(runtime − bitalloc) / bitalloc loss; None without a (non-zero) bitalloc loss."""
        return (self.loss - self.bitalloc_loss) / self.bitalloc_loss if self.bitalloc_loss else None

    @property
    def bytes_rel_diff(self) -> Optional[float]:
        """stored / counted layer bytes − 1; None for a preset."""
        return self.stored_layer_bytes / self.counted_layer_bytes - 1 if self.counted_layer_bytes else None


class Front(_Doc):
    """A finished job's results: the measured mixed points, the uniform baselines, and how they were found."""

    schema_: Literal["bitalloc.front/2"] = Field(FRONT_SCHEMA, alias="schema")
    bitalloc_version: str = __version__
    job: JobInfo
    model: ModelInfo
    data: DataInfo
    sensitivity: SensitivityInfo
    solver: SolverInfo
    metric: MetricDoc
    reference: Reference
    points: list[Point]
    proxy_front: ProxyFront = ProxyFront()
    memory: MemoryInfo = MemoryInfo()
    timings_s: dict[str, float] = {}
    evaluations: EvaluationInfo = EvaluationInfo()
    tracking: Optional[TrackingInfo] = None
    runtime_points: list[RuntimePoint] = []
    # sha256 of what the job wrote, checked whenever results are read: `front` (this document without `digest` and
    # `runtime_points`, which verify adds to) and each config file by its path; empty in results written before
    digest: dict[str, str] = {}

    def content_sha256(self) -> str:
        """The digest of this front's own claims (`digest["front"]`)."""
        doc = {k: v for k, v in self.document().items() if k not in ("digest", "runtime_points")}
        return hashlib.sha256(configio.dumps(doc).encode()).hexdigest()

    @property
    def mixed(self) -> list[Point]:
        return sorted((p for p in self.points if p.kind == "mixed"), key=lambda p: p.bytes)

    @property
    def uniform(self) -> list[Point]:
        return sorted((p for p in self.points if p.kind == "uniform"), key=lambda p: p.bytes)

    @property
    def size_axis(self) -> str:
        """What the points' bytes are, as the front's plot and table say it."""
        if self.model.bytes_of == "llamacpp":
            return "llama.cpp GGUF file size"
        if self.model.bytes_of:
            return f"{self.model.bytes_of}'s checkpoint folder size (model card aside)"
        return "weights + scales + zero points + unquantized tensors"

    def bytes_at_avg_bits(self, avg_bits: float) -> int:
        """Whole-model bytes at an average bit width over the quantized layers (the budgets' own rule)."""
        return bytes_at_avg_bits(avg_bits, self.model.quantized_params, self.model.other_bytes)

    def document(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


class ConfigModel(_Doc):
    source: str
    content_hash: str
    type: Optional[str] = None
    other_bytes: Optional[int] = None


class FormatDoc(_Doc):
    bits: int
    group_size: Optional[int] = None
    symmetric: Optional[bool] = None
    scale_dtype: str = "float16"
    method: str = "rtn"  # the quantizer that made the level (bitalloc.quantizers)
    ggml: Optional[str] = None  # llama.cpp's type, for method gguf


class Totals(_Doc):
    bytes: int
    mib: float
    avg_bits: float


class ConfigDoc(_Doc):
    """One format per layer, with the shapes and totals that make its bytes checkable, and what it measured
    (`metrics`: predicted, and the metric's loss and quality by their names, e.g. kl and ppl, with tokens), and the
    parameters of the quantizers that made its levels (`quantizers`: method -> params), which an export hands to
    the runtime's own quantizer (empty in configs written before: their methods' defaults). `embeddings` names the
    layers that are token embeddings (looked up row by row; a runtime must store them as such)."""

    schema_: Literal["bitalloc.config/1"] = Field(CONFIG_SCHEMA, alias="schema")
    bitalloc_version: str = __version__
    job_spec_hash: str
    model: ConfigModel
    metric: MetricDoc = MetricDoc()
    layers: dict[str, FormatDoc]
    shapes: dict[str, list[int]] = {}
    embeddings: list[str] = []
    totals: Totals
    metrics: dict[str, Number] = {}
    quantizers: dict[str, dict[str, Any]] = {}

    @classmethod
    def of(cls, config: BitConfig, measurement: Measurement | None, *, model_source: str, model_hash: str,
           spec_hash: str, model_type: str | None, shapes: dict[str, list[int]], metric: Metric,
           other_bytes: int, quantizers: dict[str, dict[str, Any]], embeddings: list[str] = ()) -> "ConfigDoc":
        metrics: dict[str, Number] = {"predicted": config.predicted}
        used = {f.method for f in config.assignment().values() if f.quantized}
        if measurement is not None:
            metrics.update({metric.loss: measurement.loss, metric.quality: measurement.quality,
                            "tokens": measurement.tokens})
        return cls(
            job_spec_hash=spec_hash,
            model=ConfigModel(source=model_source, content_hash=model_hash, type=model_type, other_bytes=other_bytes),
            metric=MetricDoc.of(metric),
            layers={name: FormatDoc(**fmt.to_dict()) for name, fmt in config.assignment().items()},
            shapes=shapes,
            embeddings=[n for n in embeddings if n in config.assignment()],
            totals=Totals(bytes=config.bytes, mib=round(mib(config.bytes), 6), avg_bits=round(config.avg_bits, 6)),
            metrics=metrics,
            quantizers={m: p for m, p in quantizers.items() if m in used},
        )

    def formats(self) -> dict[str, Format]:
        return {name: Format.from_dict(f.model_dump(), f"layers.{name}") for name, f in self.layers.items()}

    def measured(self) -> tuple[float, float] | None:
        """(loss, quality) if the config was measured."""
        m = self.metric.metric()
        if m.loss not in self.metrics:
            return None
        return float(self.metrics[m.loss]), float(self.metrics[m.quality])

    def document(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def _invalid(path: Path, kind: str, exc: ValidationError) -> BitallocError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "document"
    return BitallocError(str(path), f"is not a valid {kind} file ({where}: {err['msg'].removeprefix('Value error, ')}); "
                                    f"rerun the job")


def read_front(path: Path) -> Front:
    """A front file of either schema version, validated."""
    doc = configio.load(path)
    schema = doc.get("schema")
    if schema not in (FRONT_SCHEMA, FRONT_SCHEMA_V1):
        raise BitallocError(str(path), f"is not a {FRONT_SCHEMA} file")
    try:
        return Front.model_validate(doc if schema == FRONT_SCHEMA else _from_v1(doc))
    except ValidationError as exc:
        raise _invalid(path, "front", exc) from None
    except (KeyError, TypeError, AttributeError):
        raise BitallocError(str(path), f"is not a valid {FRONT_SCHEMA_V1} file; rerun the job") from None


def _from_v1(doc: dict) -> dict:
    """A `bitalloc.front/1` document in the /2 shape: metric-keyed rows become points, uniform rows points of
    kind uniform, the solver's candidate counts its evaluations."""
    metric = METRICS[(doc.get("metric") or {}).get("kind", NEXT_TOKEN)]

    def point(row: dict, kind: str) -> dict:
        fmt = row.get("format") if kind == "uniform" else None
        return {"kind": kind, "label": row["label"] if kind == "mixed" else f"uniform {fmt}", "format": fmt,
                **{k: row[k] for k in ("avg_bits", "bytes", "mib", "predicted", "config")},
                "loss": row[metric.loss], "quality": row[metric.quality]}

    solver, ref = doc["solver"], doc["reference"]
    return {
        **{k: doc[k] for k in ("bitalloc_version", "job", "model", "data", "proxy_front", "memory", "timings_s",
                               "evaluations") if k in doc},
        "schema": FRONT_SCHEMA,
        "sensitivity": doc["sensitivity"],
        "solver": {"name": solver["name"], "slack_bytes": solver.get("slack_bytes", 0),
                   "front_size": solver["front_size"], "evaluations": solver.get("candidate_evaluations", {})},
        "metric": MetricDoc.of(metric).model_dump(),
        "reference": {"bytes": ref["bytes"], "mib": ref["mib"], "quality": ref[metric.quality],
                      "tokens": ref["tokens"]},
        "points": [point(r, "mixed") for r in doc["points"]] + [point(r, "uniform") for r in doc["uniform"]],
        "tracking": doc.get("tracking") or None,
    }


def read_config(path: Path) -> ConfigDoc:
    doc = configio.read(path, CONFIG_SCHEMA)
    try:
        return ConfigDoc.model_validate(doc)
    except ValidationError as exc:
        raise _invalid(path, "config", exc) from None


def json_schema(kind: str) -> dict:
    """The JSON Schema of `front` or `config` documents, as shipped in SCHEMA_DIR."""
    models = {"front": Front, "config": ConfigDoc}
    if kind not in models:
        raise BitallocError("KIND", f"{kind!r} is not a document kind; allowed: {', '.join(models)}")
    schema = models[kind].model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://bitalloc.dev/schemas/{kind}.schema.json", **schema}
