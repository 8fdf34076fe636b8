"""Round-to-nearest: min-max per group (bitalloc's packed kernels' reference), and on the integer grid of GPTQ and
compressed-tensors (what llm-compressor's QuantizationModifier makes)."""

from __future__ import annotations

from bitalloc.kernels.packed import PackedWeight, pack, pack_weight

from .base import QuantizerBase, register
from .layouts import CompressedTensors


@register("rtn")
class RoundToNearest(QuantizerBase):
    summary = "min-max round-to-nearest per group: bitalloc's packed kernels' reference"

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        return pack_weight(weight, fmt)


@register("rtn-int")
class IntegerGrid(QuantizerBase):
    summary = "round-to-nearest on the integer grid of GPTQ and compressed-tensors (llm-compressor's RTN)"
    layout = CompressedTensors()

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        from .gptq import round_to_grid

        return pack(round_to_grid(weight, fmt))
