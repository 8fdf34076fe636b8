"""Constraints on a search turned into a Problem's parts: pinned layers and min/max bits as the allowed
mask, tied layers as groups, and BOPs and latency as resource limits (`Limit`s)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.model import QuantizableLayer
from bitalloc.types import Limit

PinValue = Union[int, str, list]
ACTIVATION_BITS = 16


class BopsLimit(Limit):
    name, field = "bops", "search.max_bops"


class LatencyLimit(Limit):
    """Seconds; the ILP counts integer nanoseconds, rounded up per option."""

    name, field, unit, scale = "latency", "search.max_latency", "s", 1e9


@dataclass(frozen=True)
class Constraints:
    """What a search may choose besides the byte budget: pins (layer regex -> bits or format names), ties,
    min/max bits, and resource limits. Empty means every format for every layer."""

    pin: dict[str, PinValue] = field(default_factory=dict)
    tie: list[str] = field(default_factory=list)
    min_bits: Optional[int] = None
    max_bits: Optional[int] = None
    max_bops: Optional[float] = None
    max_latency: Optional[float] = None
    latency_table: Optional[str] = None

    def check(self, formats: tuple[Format, ...]) -> None:
        """What can be refused from the spec alone, before a model loads: patterns that are not regular expressions,
        pins to formats the job does not have, a bit range no job format lies in, a latency table that cannot be
        read."""
        for pattern, value in self.pin.items():
            compile_pattern(pattern, f"search.pin[{pattern!r}]")
            _formats_for(value, formats, f"search.pin[{pattern!r}]")
        for k, pattern in enumerate(self.tie):
            compile_pattern(pattern, f"search.tie[{k}]")
        bits = [f.bits for f in formats]
        if not any((self.min_bits is None or b >= self.min_bits) and (self.max_bits is None or b <= self.max_bits)
                   for b in bits):
            raise BitallocError("search.min_bits", f"no job format lies within min_bits {self.min_bits} .. max_bits "
                                                   f"{self.max_bits}")
        if self.latency_table is not None:
            latency_entries(self.latency_table)

    def limits(self, layers: list[QuantizableLayer], formats: tuple[Format, ...]) -> tuple[Limit, ...]:
        out: list[Limit] = []
        if self.max_bops:
            out.append(BopsLimit(bops_table(layers, formats), int(self.max_bops)))
        if self.max_latency is not None:
            out.append(LatencyLimit(latency_table(self.latency_table, layers, formats), self.max_latency))
        return tuple(out)


def _formats_for(value, formats: tuple[Format, ...], field: str) -> set[int]:
    """A pin's value: a bit width (every job format with it), a format name such as w4g64a, or a list of them."""
    values = value if isinstance(value, list) else [value]
    picked: set[int] = set()
    for v in values:
        match = {j for j, f in enumerate(formats) if (f.bits == v if isinstance(v, int) else f.name == v)}
        if not match:
            names = ", ".join(f.name for f in formats)
            raise BitallocError(field, f"{v!r} is none of the job's formats; allowed: a bit width or one of {names}")
        picked |= match
    return picked


def allowed_mask(layers: list[QuantizableLayer], formats: tuple[Format, ...], pins: dict[str, PinValue],
                 min_bits: int | None, max_bits: int | None) -> np.ndarray:
    allowed = np.ones((len(layers), len(formats)), dtype=bool)
    bits = np.array([f.bits for f in formats])
    if min_bits is not None:
        allowed &= bits >= min_bits
    if max_bits is not None:
        allowed &= bits <= max_bits
    if not allowed.any():
        raise BitallocError("search.min_bits", f"no job format lies within min_bits {min_bits} .. max_bits {max_bits}")
    for pattern, value in pins.items():
        field = f"search.pin[{pattern!r}]"
        rx = compile_pattern(pattern, field)
        rows = [i for i, layer in enumerate(layers) if rx.search(layer.name)]
        if not rows:
            raise BitallocError(field, "matches no quantizable layer; see `bitalloc layers MODEL`")
        keep = np.zeros(len(formats), dtype=bool)
        keep[list(_formats_for(value, formats, field))] = True
        allowed[rows] &= keep
    return allowed


def tie_groups(layers: list[QuantizableLayer], patterns: list[str]) -> tuple[tuple[int, ...], ...]:
    """Layers that match a pattern are tied to the others matching it under the same parent module,
    e.g. `self_attn\\.[qkv]_proj` ties q, k and v within each attention block."""
    groups: list[tuple[int, ...]] = []
    taken: set[int] = set()
    for k, pattern in enumerate(patterns):
        field = f"search.tie[{k}]"
        rx = compile_pattern(pattern, field)
        by_parent: dict[str, list[int]] = {}
        for i, layer in enumerate(layers):
            if rx.search(layer.name):
                by_parent.setdefault(layer.name.rsplit(".", 1)[0], []).append(i)
        if not by_parent:
            raise BitallocError(field, f"{pattern!r} matches no quantizable layer")
        for members in by_parent.values():
            if taken & set(members):
                raise BitallocError(field, f"{pattern!r} ties a layer that an earlier tie already holds")
            taken |= set(members)
            if len(members) > 1:
                groups.append(tuple(members))
    return tuple(groups)


def bops_table(layers: list[QuantizableLayer], formats: tuple[Format, ...]) -> np.ndarray:
    """Bit operations per token: multiply-accumulates × weight bits × activation bits (16)."""
    numel = np.array([layer.numel for layer in layers], dtype=np.int64)
    return numel[:, None] * np.array([f.bits for f in formats], dtype=np.int64)[None, :] * ACTIVATION_BITS


def latency_table(path: str, layers: list[QuantizableLayer], formats: tuple[Format, ...]) -> np.ndarray:
    """Seconds per (layer, format) from a measured table file (`bitalloc.latency/1`: entries of
    {out, in, format, seconds})."""
    field = "search.latency_table"
    entries = latency_entries(path)
    table = np.zeros((len(layers), len(formats)))
    for i, layer in enumerate(layers):
        for j, fmt in enumerate(formats):
            key = (layer.out_features, layer.in_features, fmt.name)
            if key not in entries:
                raise BitallocError(field, f"{path!r} has no entry for {layer.out_features}x{layer.in_features} at {fmt.name}")
            table[i, j] = entries[key]
    return table


def latency_entries(path: str) -> dict[tuple, float]:
    """A `bitalloc.latency/1` table's seconds by (out, in, format name)."""
    try:
        doc = json.loads(Path(path).read_text())
        return {(e["out"], e["in"], e["format"]): float(e["seconds"]) for e in doc["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise BitallocError("search.latency_table", f"{path!r} is not a readable bitalloc.latency/1 table") from None


def compile_pattern(pattern: str, field: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BitallocError(field, f"{pattern!r} is not a valid regular expression ({exc})") from None
