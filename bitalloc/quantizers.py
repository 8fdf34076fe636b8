"""Quantizers: how a weight becomes a level (its stored form at one format), registered by name.

A quantizer turns an [out, in] weight into a `PackedWeight` — packed codes, scales and zero points, the bytes the
cost model counts — so the level store keeps, and every consumer reads, one form whatever made it. `version` and
the declared parameters key the level store: raise `version` when a change alters the levels a quantizer makes.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from bitalloc.kernels.packed import PackedWeight, pack_weight

from .formats import Format
from .registry import Registry, declared_parameters


class Quantizer(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]

    def params(self) -> dict: ...

    def quantize(self, weight: torch.Tensor, fmt: Format) -> PackedWeight: ...


class QuantizerBase:
    version: ClassVar[int] = 1

    def params(self) -> dict:
        return {name: getattr(self, name) for name in declared_parameters(type(self))[0]}

    def key(self) -> dict:
        """What identifies the levels this quantizer makes (the level store's key)."""
        return {"quantizer": self.name, "version": self.version, "params": self.params()}


_REGISTRY: Registry[Quantizer] = Registry("a quantizer", "formats.method", "formats.params")
QUANTIZERS = _REGISTRY.classes
register = _REGISTRY.register
get_quantizer = _REGISTRY.create


@register("rtn")
class RoundToNearest(QuantizerBase):
    """Min-max round-to-nearest per group (`bitalloc.kernels.rtn`): the layout bitalloc's packed kernels run."""

    def quantize(self, weight: torch.Tensor, fmt: Format) -> PackedWeight:
        return pack_weight(weight, fmt)
