"""Job specs: YAML validated by pydantic; every mistake becomes one `BitallocError` naming its field."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.formats import KEEP_BITS, MAX_GROUP_SIZE, QUANT_BITS, SCALE_DTYPES, Format
from bitalloc.model import DEFAULT_MODEL
from bitalloc.quantizers import Quantizer, get_quantizer
from bitalloc.runtimes import RUNTIMES, get_runtime
from bitalloc.runtimes.llamacpp import check_types
from bitalloc.search.constraints import Constraints
from bitalloc.units import parse_bytes

_NUMBER = re.compile(r"^\s*[0-9]+(\.[0-9]*)?\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """`source` is required: a job always says which model it searches. Custom code shipped with a model
    (transformers' `auto_map`) runs only when `trust_remote_code: true` says so. A model of which bitalloc can
    quantize less than half the non-embedding parameters is refused unless `allow_partial: true`. The token
    embedding (and a head tied to it, the same tensor) is searched where every target stores it quantized
    (`embeddings` unset), kept at its dtype with `embeddings: false`."""

    source: str
    include: list[str] = []
    exclude: list[str] = []
    embeddings: Optional[bool] = None
    allow_partial: bool = False  # search a model of which bitalloc can quantize less than half
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _quantize_tied(cls, data):
        """Specs written before the embedding was a unit say `quantize_tied`: read as `embeddings`, with a word."""
        if isinstance(data, dict) and "quantize_tied" in data:
            data = dict(data)
            tied = data.pop("quantize_tied")
            print(f"note: model.quantize_tied is now model.embeddings (a tied head is the embedding's tensor); "
                  f"read as embeddings: {str(bool(tied)).lower()}", file=sys.stderr)
            data.setdefault("embeddings", bool(tied))
        return data


class FormatsSpec(_Strict):
    """Candidate formats made by one quantizer (`method`, with its `params`): every combination of the listed bits,
    group sizes and symmetries, or llama.cpp's `types` (method gguf), or all a runtime `target` stores and runs.
    `formats` may be a list of these, to search formats made by several quantizers together."""

    target: Optional[str] = None
    method: Optional[str] = None
    params: dict[str, Any] = {}
    bits: list[int] = [2, 3, 4, 5, 6, 8]
    group_size: Union[int, list[int]] = 64
    symmetric: Union[bool, list[bool]] = False
    scale_dtype: str = "float16"
    types: list[str] = []

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        if v is not None and v not in RUNTIMES:
            raise ValueError(f"{v!r} is not a runtime target; allowed: {', '.join(RUNTIMES)}")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        allowed = QUANT_BITS + (KEEP_BITS,)
        for b in v:
            if b not in allowed:
                raise ValueError(f"{b} is not allowed; allowed: {', '.join(map(str, allowed))}")
        if not v:
            raise ValueError("at least one bit width is needed")
        return sorted(set(v))

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v == []:
            raise ValueError("at least one group size is needed, e.g. 64")
        for g in v if isinstance(v, list) else [v]:
            if not 1 <= g <= MAX_GROUP_SIZE:
                raise ValueError(f"{g} is not allowed; use an integer from 1 to {MAX_GROUP_SIZE}, e.g. 32, 64, 128")
        return v

    @field_validator("symmetric")
    @classmethod
    def _symmetric(cls, v):
        if v == []:
            raise ValueError("at least one of true, false is needed")
        return v

    @field_validator("scale_dtype")
    @classmethod
    def _scale(cls, v: str) -> str:
        if v not in SCALE_DTYPES:
            raise ValueError(f"{v!r} is not allowed; allowed: {', '.join(SCALE_DTYPES)}")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """A target's entry is written as the user gives it (target, method, params): the formats it expands to are
        the target's, and a saved spec must read back."""
        doc = handler(self)
        return {k: doc[k] for k in ("target", "method", "params")} if self.target else doc

    @model_validator(mode="after")
    def _method(self):
        if self.target:
            given = sorted(self.model_fields_set & {"bits", "group_size", "symmetric", "scale_dtype", "types"})
            fixed = [k for k in given if getattr(self, k) != type(self).model_fields[k].default]
            if given and not fixed:  # what specs saved before targets were written as given hold: read, with a word
                print(f"note: formats.{given[0]}: set by target {self.target}; the value given is ignored",
                      file=sys.stderr)
            if fixed:
                raise BitallocError(f"formats.{fixed[0]}", f"set by target {self.target}: remove it, or drop the "
                                                           f"target to list formats yourself")
            allowed = get_runtime(self.target).methods
            if self.method is not None and self.method not in allowed:
                raise BitallocError("formats.method", f"{self.method!r} is not what {self.target} loads; allowed: "
                                                      f"{', '.join(allowed)}")
        method = self.resolved_method()
        get_quantizer(method, **self.params)  # its parameters checked by name, type and value
        if method == "gguf":
            if not self.target:
                if not self.types:
                    raise BitallocError("formats.types", "method gguf makes llama.cpp's types: list them, e.g. "
                                                         "[q4_K, q6_K], or use target: llamacpp")
                try:
                    check_types(self.types, bool(self.params.get("imatrix")))
                except ValueError as exc:
                    raise BitallocError("formats.types", str(exc)) from None
        elif self.types:
            raise BitallocError("formats.types", f"types are llama.cpp's and need method gguf (this is {method})")
        return self

    def resolved_method(self) -> str:
        if self.method:
            return self.method
        if self.target:
            return get_runtime(self.target).methods[0]
        return "gguf" if self.types else "rtn"

    def quantizer(self) -> Quantizer:
        return get_quantizer(self.resolved_method(), **self.params)

    def expand(self) -> tuple[Format, ...]:
        method = self.resolved_method()
        if self.target:
            return get_runtime(self.target).formats(method, self.params)
        if method == "gguf":
            return tuple(Format.of_ggml(t) for t in dict.fromkeys(self.types))
        groups = self.group_size if isinstance(self.group_size, list) else [self.group_size]
        syms = self.symmetric if isinstance(self.symmetric, list) else [self.symmetric]
        out = []
        for b in self.bits:
            if b == KEEP_BITS:
                out.append(Format(b, scale_dtype=self.scale_dtype if self.scale_dtype != "float32" else "float16"))
                continue
            out.extend(Format(b, g, s, self.scale_dtype, method) for g in groups for s in syms)
        return tuple(dict.fromkeys(out))


def _as_list(v):
    return [v] if isinstance(v, dict) else v


class DataSpec(_Strict):
    source: Union[str, list[str]] = "shakespeare"
    seq_len: int = Field(512, ge=2, le=1 << 20)
    calibration: int = Field(8, ge=0, le=1 << 16)
    evaluation: int = Field(4, ge=1, le=1 << 16)
    batch_size: int = Field(2, ge=1, le=1 << 16)
    # how the FP reference's log-probabilities are kept: float32 (exact), or float16 (half the memory; each
    # measured KL then carries a bound on the error this adds, in front.json)
    reference: Literal["float32", "float16"] = "float32"


class SensitivitySpec(_Strict):
    """Default: Fisher (output side, its own default), the best predictor at acceptable cost in `bitalloc
    sensitivity score` on the default model (Spearman 0.977 against 0.984 for exact per-layer measurement, at
    4 % of its time). `params` are the chosen estimator's own; what is left out takes the estimator's default."""

    estimator: str = "fisher"
    params: dict[str, Any] = {}


def _check_size(text: str) -> None:
    """A size with a unit, or pydantic's ValueError (so the error names the field where the size was written)."""
    try:
        parse_bytes(text, "size")
    except BitallocError as exc:
        raise ValueError(exc.message) from None


def _check_budget(b: Union[float, str]) -> Union[float, str]:
    """A number (or numeric string) is average bits in (0, 16]; any other string must be a size with a unit."""
    if isinstance(b, str) and not _NUMBER.match(b):
        _check_size(b)
    elif not 0 < float(b) <= KEEP_BITS:
        raise ValueError(f"{b} average bits is outside (0, 16]; write bytes with a unit, e.g. 80MiB")
    return b


Budget = Annotated[Union[float, str], AfterValidator(_check_budget)]


class SearchSpec(_Strict):
    solver: str = "dp"
    params: dict[str, Any] = {}
    budgets: list[Budget] = []
    points: int = Field(6, ge=0, le=1000, description="front points measured, spread evenly in bytes")
    pin: dict[str, Union[int, str, list[Union[int, str]]]] = {}
    tie: list[str] = []
    min_bits: Optional[int] = None
    max_bits: Optional[int] = None
    max_bops: Optional[float] = Field(None, gt=0)
    max_latency: Optional[float] = Field(None, gt=0)
    latency_table: Optional[str] = None
    evaluations: int = Field(0, ge=0, le=10**6, description="screening evaluations a measuring solver may spend")
    screen_tokens: int = Field(512, ge=2, le=1 << 24, description="calibration tokens per screening evaluation")
    evaluator: Literal["auto", "torch", "llamacpp"] = Field(
        "auto", description="what measures candidates: torch (bitalloc's evaluator), llamacpp (llama.cpp's own "
                            "forward on llama.cpp levels), auto: the target runtime's (llamacpp for its target)")

    @model_validator(mode="after")
    def _latency(self):
        if self.max_latency is not None and self.latency_table is None:
            raise ValueError("max_latency needs latency_table (a file written by `bitalloc latency`)")
        return self

    def constraints(self) -> Constraints:
        return Constraints(pin=self.pin, tie=self.tie, min_bits=self.min_bits, max_bits=self.max_bits,
                           max_bops=self.max_bops, max_latency=self.max_latency, latency_table=self.latency_table)


class RunSpec(_Strict):
    """Where evaluations run: `workers: 0` in this process; otherwise Ray actors, on an embedded local
    Ray (default, `auto` = one worker per `threads_per_worker` CPUs) or the cluster at `address`."""

    address: Optional[str] = None
    memory_limit: Optional[str] = None  # e.g. 20GiB: plan against this instead of what the machine reports free
    workers: Union[int, Literal["auto"]] = "auto"
    threads_per_worker: int = Field(1, ge=1, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)

    @field_validator("memory_limit")
    @classmethod
    def _memory(cls, v):
        if v is not None:
            _check_size(v)
        return v

    def worker_count(self) -> int:
        """Ray workers the job starts: 0 evaluates in its own process, unless a cluster address is given (a job sent
        to a cluster evaluates there, `auto` many workers when 0 or auto)."""
        if self.workers not in (0, "auto"):
            return self.workers
        if self.workers == 0 and not self.address:
            return 0
        return max(1, (os.cpu_count() or 1) // self.threads_per_worker)

    @field_validator("workers")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, int) and not 0 <= v <= 1024:
            raise ValueError(f"{v} is not allowed; use 0 (in this process), a count up to 1024, or auto")
        return v


class TrackingSpec(_Strict):
    """MLflow tracking: `uri` (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir);
    `experiment` defaults to the job's name."""

    enabled: bool = True
    uri: Optional[str] = None
    experiment: Optional[str] = None


class JobSpec(_Strict):
    name: str = Field("job", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
    seed: int = Field(0, ge=0, lt=2**32)
    model: ModelSpec
    formats: Annotated[list[FormatsSpec], BeforeValidator(_as_list)] = [FormatsSpec()]
    data: DataSpec = DataSpec()
    sensitivity: SensitivitySpec = SensitivitySpec()
    search: SearchSpec = SearchSpec()
    run: RunSpec = RunSpec()
    tracking: TrackingSpec = TrackingSpec()
    output: str = "runs/{name}"

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        try:
            v.format(name="job")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"{v!r} is not a usable path pattern ({type(exc).__name__}: {exc}); the one field "
                             f"allowed is {{name}}, e.g. runs/{{name}}") from None
        if not v.strip():
            raise ValueError("an output path is needed, e.g. runs/{name}")
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[FormatsSpec]) -> list[FormatsSpec]:
        if not v:
            raise ValueError("at least one set of formats is needed")
        seen: dict[str, dict] = {}
        for k, part in enumerate(v):
            method = part.resolved_method()
            if seen.setdefault(method, part.params) != part.params:
                raise BitallocError(f"formats[{k}].params", f"{method} has other params in an earlier entry; one "
                                                            f"method, one set of params")
        return v

    def expand_formats(self) -> tuple[Format, ...]:
        """Every entry's formats, in order, each once."""
        return tuple(dict.fromkeys(f for part in self.formats for f in part.expand()))

    def quantizers(self) -> dict[str, Quantizer]:
        return {part.resolved_method(): part.quantizer() for part in self.formats}

    def target_ties(self, layers: list) -> list[tuple[int, ...]]:
        """Layers the targets' runtimes make share a format."""
        return [g for part in self.formats if part.target for g in get_runtime(part.target).ties(layers)]

    def problem(self, model, layers: list, table=None, file=None):
        """The job's problem (byte costs — bitalloc's count, or the target's `file` —, the table's errors when given,
        the search's constraints and the targets' ties), built in this one place for every command that searches or
        scores the job."""
        from bitalloc.pipeline import build_problem

        return build_problem(model, layers, self.expand_formats(), table, self.search.constraints(),
                             self.target_ties(layers), file)

    def file_sized(self) -> bool:
        """Whether the front's bytes are the target's file's (known only once the levels are made)."""
        target = self.target()
        return bool(target) and get_runtime(target).file_sized

    def file_bytes(self, ws):
        """How the target's runtime stores a point (its file's bytes), where it says; None: bitalloc's count."""
        target = self.target()
        return get_runtime(target).file_bytes(ws) if target else None

    def embeddings(self) -> tuple[bool, str]:
        """(whether the token embedding is searched, why not when a target keeps it): every target must store it
        quantized; `model.embeddings: true` where one cannot is refused."""
        keeping = [part.target for part in self.formats if part.target and not get_runtime(part.target).embeddings]
        if self.model.embeddings is False:
            return False, ""
        if keeping:
            if self.model.embeddings:
                raise BitallocError("model.embeddings", f"target {keeping[0]} stores the token embedding unquantized; "
                                                        f"remove embeddings: true, or target llamacpp")
            return False, f"target {keeping[0]} stores the token embedding unquantized"
        return True, ""

    def evaluator(self) -> str:
        """The backend that measures candidates: `search.evaluator`, or for auto the target runtime's."""
        if self.search.evaluator != "auto":
            return self.search.evaluator
        target = self.target()
        return get_runtime(target).evaluator if target else "torch"

    def target(self) -> Optional[str]:
        """The runtime target, when every entry names the same one."""
        names = {part.target for part in self.formats}
        return names.pop() if len(names) == 1 else None

    def output_dir(self) -> Path:
        return Path(self.output.format(name=self.name))

    def spec_hash(self) -> str:
        """sha256 of the canonical spec without output dir, where it runs and where it is tracked:
        equal hashes asked the same question."""
        body = json.dumps(self.model_dump(mode="json", exclude={"output", "run", "tracking"}), sort_keys=True,
                          separators=(",", ":"))
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        ann = model.model_fields.get(part)
        annotation = ann.annotation if ann is not None else None
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _one_line(exc: ValidationError, data: dict) -> BitallocError:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "float", "int"))))
    if loc[:2] == ("formats", 0) and isinstance(data.get("formats"), dict):
        loc = loc[:1] + loc[2:]  # one mapping of formats: no index
    field = _loc(loc) or "job"
    if err["type"] == "extra_forbidden":
        return BitallocError(field, f"unknown key; allowed here: {', '.join(_fields_at(loc))}")
    if err["type"] == "missing":
        if field in ("model", "model.source"):
            return BitallocError("model.source", f"required: name the model to search ({DEFAULT_MODEL!r}, a model "
                                                 f"directory, a .gguf file or a Hugging Face id available offline)")
        return BitallocError(field, "required")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return BitallocError(field, msg)
    got = repr(err.get("input"))
    return BitallocError(field, f"{msg} (got {got if len(got) <= 60 else got[:57] + '...'})")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set a.b=value`: value parsed as YAML, so numbers, lists and booleans work as in the file."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BitallocError("--set", f"{item!r} is not KEY=VALUE, e.g. --set data.evaluation=2")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BitallocError(f"--set {key}", f"{part!r} is not a section")
            node = child
        node[parts[-1]] = configio.parse_yaml(raw, f"--set {key}")
    return data


def parse_spec(data: Any, overrides: list[str] | None = None) -> JobSpec:
    """A validated spec: every field, and the chosen estimator's and solver's parameters against what they declare."""
    from bitalloc.search.base import check_solver
    from bitalloc.sensitivity.base import check_estimator

    if data is None:
        raise BitallocError("job", "the job file is empty; it needs at least model.source (see "
                                   "jobs/examples/smollm2.yaml)")
    if not isinstance(data, dict):
        raise BitallocError("job", "the job file must be a YAML mapping of sections (model, formats, data, ...)")
    data = apply_overrides(data, overrides or [])
    try:
        spec = JobSpec.model_validate(data)
        spec.expand_formats()
        check_estimator(spec.sensitivity.estimator, spec.sensitivity.params)
        check_solver(spec.search.solver, spec.search.params)
    except ValidationError as exc:
        raise _one_line(exc, data) from None
    except BitallocError as exc:
        raise BitallocError(re.sub(r"^format(?=\.|$)", "formats", exc.field), exc.message) from None
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise BitallocError("JOB", f"{str(path)!r} is not a file; give a job YAML such as jobs/examples/smollm2.yaml")
    return parse_spec(configio.parse_yaml(configio.read_text(path, "JOB"), "JOB"), overrides)
