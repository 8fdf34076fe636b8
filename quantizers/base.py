"""The quantizer interface and its registry: a quantizer turns an [out, in] weight into a level, its stored form at
one format, and declares the byte layout that form is stored in (`layouts`), so the cost model counts what the
runtime keeps.

A format names its quantizer (`Format.method`); the job gives each method's parameters (`formats.params`), checked
against the quantizer's `Params` model (pydantic: names, types and ranges). `version` and the parameters key the
level store (with the calibration data, for quantizers that read it): raise `version` when a change alters the
levels made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.kernels.packed import PackedWeight
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.registry import Parameterised, Registry

from .inputs import Kind, collect, data_free
from .layouts import Layout

Level = PackedWeight  # or gguf.files.GgmlWeight: both have fmt, in_features, nbytes, to(device)
Write = Callable[[str, Format, object], None]


@dataclass(frozen=True)
class Calibration:
    """The calibration sequences quantizers may read, and their hash (part of such levels' key)."""

    tokens: torch.Tensor
    data_hash: str


class Quantizer(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]
    layout: ClassVar[Layout]
    inputs: ClassVar[Kind | None]

    def params(self) -> dict: ...

    def key(self) -> dict: ...

    def reads_calibration(self) -> bool: ...

    def make(self, model: LoadedModel, layers: list[QuantizableLayer], missing: dict[str, list[Format]],
             calibration: Calibration | None, folder: Path, write: Write,
             progress: Callable[[int], None] | None = None) -> int: ...


class QuantizerBase(Parameterised):
    """Parameters are the fields of the class's `Params` model (`registry.Parameterised`)."""

    version: ClassVar[int] = 1
    layout: ClassVar[Layout] = Layout()
    inputs: ClassVar[Kind | None] = None  # what it reads of the calibration data: None, diagonal or hessian
    summary: ClassVar[str] = ""
    data_free: tuple[int, int] = (0, 0)  # of the last `make`: experts with too few routed tokens, experts in all

    def reads_calibration(self) -> bool:
        return self.inputs is not None

    def key(self) -> dict:
        """What identifies the levels this quantizer makes (the level store's key, with the calibration data's hash
        when it reads it)."""
        return {"quantizer": self.name, "version": self.version, "params": self.params()}

    def quantize(self, weight: torch.Tensor, fmt: Format, inputs: torch.Tensor | None = None) -> Level:
        raise NotImplementedError

    def make(self, model, layers, missing, calibration, folder, write, progress=None) -> int:
        """Every missing level, layer by layer (input statistics collected first, in one pass, when needed); an
        expert unit expert by expert, each against the inputs routed to it, its experts' rows stacked."""
        stats = {}
        wanted = [l for l in layers if missing.get(l.name)]
        if self.inputs and wanted:
            if calibration is None or not len(calibration.tokens):
                raise BitallocError("data.calibration", f"{self.name} quantizes against calibration inputs; give "
                                                        f"at least one calibration sequence")
            stats = collect(model, wanted, calibration.tokens, self.inputs)
        self.data_free = data_free(stats, wanted)
        made = 0
        for layer in layers:
            w = model.weight(layer) if missing.get(layer.name) else None
            for fmt in missing.get(layer.name, []):
                inputs = stats.get(layer.name)
                if layer.experts:
                    level = stack([self.quantize(w[e], fmt, None if inputs is None else inputs[e])
                                   for e in range(layer.experts)])
                else:
                    level = self.quantize(w, fmt, inputs)
                write(layer.name, fmt, level)
                made += 1
            stats.pop(layer.name, None)
            if progress:
                progress(1)
        return made


def stack(levels: list) -> Level:
    """One level of experts' levels, their rows one after another (as `QuantizableLayer.row_count` counts)."""
    first = levels[0]
    if isinstance(first, PackedWeight):
        zeros = None if first.zeros is None else torch.cat([l.zeros for l in levels])
        return PackedWeight(torch.cat([l.qweight for l in levels]), torch.cat([l.scales for l in levels]), zeros,
                            first.fmt, first.in_features)
    return type(first)(torch.cat([l.blocks for l in levels]), first.fmt, first.in_features)


REGISTRY: Registry[Quantizer] = Registry("a quantizer", "formats.method", "formats.params")
QUANTIZERS = REGISTRY.classes
register = REGISTRY.register
get_quantizer = REGISTRY.create


def layout_of(method: str, field: str = "format.method") -> Layout:
    """The byte layout of a method's levels; an unknown method is a one-line error naming what is allowed."""
    if method not in QUANTIZERS:
        raise BitallocError(field, f"{method!r} is not a quantizer; allowed: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method].layout
