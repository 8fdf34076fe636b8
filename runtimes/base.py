"""What a runtime is to bitalloc, in one class: what it stores and runs (its target: formats, the quantizers that
make them as it would, the layers it makes share a format), the file bitalloc exports for it, how `verify` builds
and measures a point in it, and the part that runs in the runtimes' environment with the runtime's own code
(`venv.py` beside its package: `check` of an exported file, and `build` for the Python runtimes).

Export: each runtime maps every layer's format to what it can express (`Placement`). Where it cannot express a layer
exactly, it names the nearest it can write (never fewer bits, never coarser groups); export refuses unless asked for
the nearest (`--nearest`), so a file never silently differs from the searched config.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from bitalloc.errors import BitallocError
from bitalloc.formats import KEEP_BITS, Format
from bitalloc.model import QuantizableLayer
from bitalloc.registry import Registry
from bitalloc.types import FileBytes

FUSED = (r"self_attn\.[qkv]_proj$", r"mlp\.(gate|up)_proj$")  # vLLM's qkv_proj and gate_up_proj


@dataclass(frozen=True)
class Layer:
    name: str
    fmt: Format
    out_features: int
    in_features: int
    experts: int = 0  # an expert unit: one projection over a block's experts
    embedding: bool = False  # the token embedding (and a head tied to it), looked up row by row


@dataclass(frozen=True)
class Placement:
    """What the runtime writes for one layer; `exact` False when it is only the nearest it can express."""

    value: Any
    exact: bool = True
    why: str = ""


class Runtime:
    """A runtime target and everything bitalloc does for it. Subclasses set the class attributes and implement
    `place_one` (or `place`), `render` and `verify`; `library` names the Python package its `venv.py` imports."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()  # the quantizers whose levels are what it makes; the first is the default
    bits: ClassVar[tuple[int, ...]] = ()
    group_sizes: ClassVar[tuple[int, ...]] = (64, 128)
    symmetric: ClassVar[bool] = True
    fused: ClassVar[tuple[str, ...]] = ()  # patterns tied under one parent module
    library: ClassVar[str | None] = None  # the package of the runtime's own code in the runtimes' environment
    builds: ClassVar[bool] = False  # `venv.py` builds the model with the runtime's code (the Python runtimes)
    export_file: ClassVar[str] = "file"  # what `export --format NAME` writes
    presets: ClassVar[tuple[str, ...]] = ()  # the runtime's own mixtures `verify --presets` measures
    experts: ClassVar[bool] = False  # writes MoE expert units (names and formats its loader reads for them)
    experts_why: ClassVar[str] = ""  # why it does not, where it does not
    embeddings: ClassVar[bool] = False  # stores a quantized token embedding (its loader dequantizes a looked-up row)
    file_sized: ClassVar[bool] = False  # `file_bytes` gives its file's bytes (the front's bytes are then the file's)
    artifact: ClassVar[str | None] = None  # what `bitalloc build` writes: "file" or "folder" (None: not written yet)
    artifact_suffix: ClassVar[str] = ""  # an artifact file's suffix
    evaluator: ClassVar[str] = "torch"  # what measures its target's candidates (`search.evaluator: auto`)

    # -- target ------------------------------------------------------------------------------------------------
    def formats(self, method: str, params: dict) -> tuple[Format, ...]:
        """What `formats: {target: NAME}` searches with `method` and its parameters."""
        return tuple(Format(b, g, self.symmetric, "float16", method) for b in self.bits for g in self.group_sizes)

    def tie_key(self, name: str) -> str | None:
        """Layers with the same key share one format (None: not tied)."""
        for k, pattern in enumerate(self.fused):
            if re.search(pattern, name):
                return f"{k}|{name.rsplit('.', 1)[0]}"
        return None

    def ties(self, layers: list[QuantizableLayer]) -> list[tuple[int, ...]]:
        """Layer indices that must share a format."""
        groups: dict[str, list[int]] = {}
        for i, layer in enumerate(layers):
            key = self.tie_key(layer.name)
            if key is not None:
                groups.setdefault(key, []).append(i)
        return [tuple(g) for g in groups.values() if len(g) > 1]

    def file_bytes(self, ws) -> FileBytes | None:
        """How this runtime's file stores a point of the job `ws` opened (the front's bytes are then the file's);
        None: bitalloc's count."""
        return None

    # -- export ------------------------------------------------------------------------------------------------
    def notes(self, layers: list[Layer]) -> list[str]:
        """What differs from the front although the file expresses every format: levels another quantizer made."""
        other = Counter(l.fmt.method for l in layers if l.fmt.quantized and l.fmt.method not in self.methods)
        return [f"{n} layers were measured with {method} levels; {self.name} quantizes them with "
                f"{' or '.join(self.methods)}, "
                f"so its quality will differ from the front's (search with formats.target: {self.name} to measure "
                f"what it runs)" for method, n in other.items()]

    def place(self, layers: list[Layer], model_type: str | None) -> dict[str, Placement]:
        return {l.name: self.place_one(l) for l in layers}

    def place_one(self, layer: Layer) -> Placement:
        raise NotImplementedError

    def render(self, layers: list[Layer], placed: dict[str, Placement], model_type: str | None,
               quantizers: dict[str, dict]) -> str:
        """The file; `quantizers` are the parameters of the quantizers that made the levels (method -> params)."""
        raise NotImplementedError

    def export(self, layers: list[Layer], model_type: str | None, nearest: bool,
               quantizers: dict[str, dict] | None = None) -> tuple[str, list[str]]:
        """The runtime's file text, and one line per layer written only as the nearest it can express.

        Without `nearest`, a config the runtime cannot express is an error that names the nearest."""
        self.check_experts(layers)
        layers, kept = self.without_embeddings(layers)
        placed = self.place(layers, model_type)
        changed = kept + [f"{l.name}: {l.fmt.name} -> {_show(placed[l.name].value)} ({placed[l.name].why})"
                          for l in layers if not placed[l.name].exact]
        if changed and not nearest:
            raise BitallocError("--format", f"{self.name} cannot express {len(changed)} of {len(layers) + len(kept)} "
                                            f"layers exactly, e.g. {changed[0]}; the nearest it can write raises "
                                            f"those; pass --nearest to write it")
        return self.render(layers, placed, model_type, quantizers or {}), changed

    def check_experts(self, layers, field: str = "--format", instead: str = "") -> None:
        """Refuse layers with MoE expert units (a config's, or a job's) where this runtime cannot store them; `instead`:
        a further way out the refusal offers."""
        units = [l.name for l in layers if l.experts]
        if units and not self.experts:
            raise BitallocError(field, f"{self.name} cannot store mixture-of-experts units ({len(units)}, e.g. "
                                       f"{units[0]}: {self.experts_why}); use one of {expert_runtimes()}{instead}")

    def without_embeddings(self, layers: list[Layer]) -> tuple[list[Layer], list[str]]:
        """The layers this runtime's file names (a token embedding only where it stores one quantized: elsewhere its
        loader keeps it at the model's dtype, outside the file), and one line per quantized embedding it keeps."""
        if self.embeddings:
            return layers, []
        kept = [f"{l.name}: {l.fmt.name} -> {KEEP_BITS}-bit ({self.name} stores the token embedding unquantized)"
                for l in layers if l.embedding and l.fmt.quantized]
        return [l for l in layers if not l.embedding], kept

    # -- build -------------------------------------------------------------------------------------------------
    def check_buildable(self, doc) -> None:
        """Refuse, before any work, a point whose formats this runtime's artifact cannot store as they were measured."""

    def unstored(self, layer: Layer, placement: Placement | None) -> str:
        """Why its artifact cannot hold this layer's level as measured ("": it can)."""
        return ""

    def format_of(self, value: Any) -> Format:
        """The format (made by its own quantizer) of what it writes for a layer (a `Placement`'s value): what
        `build --nearest` makes levels of."""
        raise BitallocError("--nearest", f"{self.name}'s artifact has no nearest formats; build a point of a job "
                                         f"searched with formats.target: {self.name}")

    def build(self, picked, card, out: Path, stages) -> dict:
        """Write the artifact of the picked point (`jobs.verify.Picked`) to `out`, with the model
        card (`jobs.card.Card`); returns its figures (`card_bytes`: what the card adds to a file)."""
        raise NotImplementedError

    # -- verify ------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Refuse, before the model loads, when what verify runs is not installed."""

    def verify(self, ws, picked, text: str, work: Path, presets: bool, stages, recipe: bool = False) -> list:
        """The point built as the runtime serves it — its artifact, where `build` writes one; with `recipe`, as the
        runtime quantizes the model itself from `text` (the exported file) — measured on the job's held-out tokens:
        a list of `RuntimePoint`s (the point, then any presets)."""
        raise NotImplementedError


def layers_of(doc) -> list[Layer]:
    """A config document's layers with their formats and shapes."""
    if not doc.shapes:
        raise BitallocError("TARGET", "the config records no layer shapes (an older result); rerun the job")
    layers = []
    for name, fmt in doc.formats().items():
        *experts, out_features, in_features = doc.shapes[name]
        layers.append(Layer(name, fmt, out_features, in_features, *experts, embedding=name in doc.embeddings))
    return layers


def _show(value: Any) -> str:
    if value is None:
        return f"{KEEP_BITS}-bit"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def anchored(names: list[str]) -> str:
    """A regex matching exactly these names."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def modules_matching(layers: list[Layer]) -> str:
    """A regex matching exactly the modules a runtime quantizes for these layers: an expert unit
    (`...experts.gate_proj`) is each expert's projection (`...experts.N.gate_proj`), as llm-compressor linearizes
    and GPTQModel defuses fused experts."""
    def one(l: Layer) -> str:
        if not l.experts:
            return re.escape(l.name)
        block, _, projection = l.name.rpartition(".")
        return rf"{re.escape(block)}\.\d+\.{re.escape(projection)}"

    return "^(?:" + "|".join(one(l) for l in layers) + ")$"


def by_value(layers: list[Layer], placed: dict[str, Placement], keep: Callable[[Any], bool]) -> dict[str, list[str]]:
    """Layer names grouped by their placed value (as canonical JSON), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for l in layers:
        value = placed[l.name].value
        if keep(value):
            groups.setdefault(json.dumps(value, sort_keys=True), []).append(l.name)
    return groups


def gptq_params(layers: list[Layer], quantizers: dict[str, dict]) -> dict | None:
    """The parameters of the GPTQ that made the config's GPTQ levels (bitalloc's defaults for a config that does not
    record them); None without GPTQ levels. One file holds one GPTQ setting."""
    from bitalloc.quantizers import QUANTIZERS, get_quantizer
    from bitalloc.quantizers.gptq import GPTQ

    methods = sorted({l.fmt.method for l in layers
                      if l.fmt.quantized and issubclass(QUANTIZERS[l.fmt.method], GPTQ)})
    found = {json.dumps(quantizers.get(m) or get_quantizer(m).params(), sort_keys=True) for m in methods}
    if len(found) > 1:
        raise BitallocError("--format", f"the config's levels come from GPTQ with {len(found)} different settings "
                                        f"({', '.join(methods)}); a runtime's file runs one")
    return json.loads(found.pop()) if found else None


def from_ggml(layer: Layer, runtime: str, bits: tuple[int, ...], group: int) -> Placement:
    """A llama.cpp type's nearest in a grouped-integer runtime: at least its bits, in groups no coarser."""
    f = layer.fmt
    value = {"bits": min((b for b in bits if b >= f.bits), default=max(bits)), "group_size": group, "sym": True}
    return Placement(value, False, f"llama.cpp's {f.ggml} has no {runtime} form")


REGISTRY: Registry[Runtime] = Registry("a runtime", "--runtime", "--runtime")
RUNTIMES = REGISTRY.classes
register = REGISTRY.register


def expert_runtimes() -> str:
    """The runtimes that store mixture-of-experts units, for a refusal to name."""
    return ", ".join(sorted(name for name, cls in RUNTIMES.items() if cls.experts))


def get_runtime(name: str, field: str = "--runtime") -> Runtime:
    """The runtime named `name`; an unknown name is a one-line error naming `field` and what is allowed."""
    if name not in RUNTIMES:
        raise BitallocError(field, f"{name!r} is not a runtime; allowed: {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[name]()
