"""llama.cpp's ggml weight types as bitalloc formats: what a block holds, which rows take it, what replaces it.

Block sizes and bytes come from gguf-py (`GGML_QUANT_SIZES`), so the cost model counts exactly the bytes a GGUF
file stores. A type fits a layer when its row width is a multiple of the block size; llama-quantize replaces a type
that does not fit by `fallback` (llama.cpp's `tensor_type_fallback`), which is also what a uniform preset does.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class GgmlType:
    name: str  # gguf-py / llama.cpp spelling, e.g. q4_K
    bits: int  # nominal bits per weight (what min_bits / max_bits / pins by bit width see)
    symmetric: bool
    needs_imatrix: bool = False
    fallback: str | None = None  # llama.cpp's replacement when a row is not a multiple of the block

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name.upper()]

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def ftype(self) -> str:
        """llama-quantize's name for a file whose default type (what `--pure` writes for every matrix) is this type:
        its own name, except iq2_s, the default of IQ2_M files (IQ2_S files default to iq2_xs)."""
        return {"iq2_s": "IQ2_M"}.get(self.name, self.name.upper())

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block * self.block_bytes

    def fits(self, in_features: int) -> bool:
        return in_features % self.block == 0


_TYPES = [
    GgmlType("q2_K", 2, False, fallback="q4_0"),
    GgmlType("q3_K", 3, True, fallback="q4_0"),
    GgmlType("q4_K", 4, False, fallback="q5_0"),
    GgmlType("q5_K", 5, False, fallback="q5_1"),
    GgmlType("q6_K", 6, True, fallback="q8_0"),
    GgmlType("q4_0", 4, True),
    GgmlType("q4_1", 4, False),
    GgmlType("q5_0", 5, True),
    GgmlType("q5_1", 5, False),
    GgmlType("q8_0", 8, True),
    GgmlType("iq4_nl", 4, True),
    GgmlType("iq4_xs", 4, True, fallback="iq4_nl"),
    GgmlType("iq3_s", 3, True, fallback="iq4_nl"),
    GgmlType("iq3_xxs", 3, True, True, "iq4_nl"),
    GgmlType("iq2_s", 2, True, True, "iq4_nl"),
    GgmlType("iq2_xs", 2, True, True, "iq4_nl"),
    GgmlType("iq2_xxs", 2, True, True, "iq4_nl"),
    GgmlType("iq1_m", 1, True, True, "iq4_nl"),
    GgmlType("iq1_s", 1, True, True, "iq4_nl"),
]
GGML_TYPES: dict[str, GgmlType] = {t.name: t for t in _TYPES}


def stored_type(name: str, in_features: int) -> str | None:
    """The type llama-quantize stores for a row of this width when asked for `name` (None: it keeps F16)."""
    t = GGML_TYPES[name]
    if t.fits(in_features):
        return name
    if t.fallback and GGML_TYPES[t.fallback].fits(in_features):
        return t.fallback
    return None
