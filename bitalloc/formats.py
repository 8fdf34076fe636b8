"""Weight formats and their exact storage cost.

A format is round-to-nearest grouped quantization along a layer's input dimension:
`bits` per weight, one scale per group (and one zero point per group when asymmetric), both
stored in `scale_dtype`. `bits == 16` keeps the weight unquantized, stored in a 16-bit float
(`scale_dtype` names which: float16 or bfloat16).

Storage layout counted by `weight_bytes` (the packed layout of `bitalloc.kernels`): each row of
`in_features` codes is packed into 32-bit words, ceil(in_features * bits / 32) words per row, so
3-bit packs 32 codes into 3 words with no wasted bits. A group size that does not divide
`in_features` leaves a shorter last group in every row, with its own scale and zero point:
ceil(in_features / group_size) groups per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BitallocError

QUANT_BITS = (2, 3, 4, 5, 6, 8)
KEEP_BITS = 16
SCALE_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}
MAX_GROUP_SIZE = 1 << 16  # wider than any row: a group of at least a row's width is one group per row


@dataclass(frozen=True, order=True)
class Format:
    bits: int
    group_size: int | None = 64
    symmetric: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits == KEEP_BITS:
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "symmetric", True)
        validate_format(self, "format")

    @property
    def quantized(self) -> bool:
        return self.bits != KEEP_BITS

    @property
    def name(self) -> str:
        if not self.quantized:
            return "fp16" if self.scale_dtype == "float16" else "bf16"
        kind = "s" if self.symmetric else "a"
        scale = {"float16": "", "bfloat16": "-bf16", "float32": "-f32"}[self.scale_dtype]
        return f"w{self.bits}g{self.group_size}{kind}{scale}"

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric if self.quantized else None,
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict, field: str = "format") -> "Format":
        try:
            bits = int(data["bits"])
        except (KeyError, TypeError, ValueError):
            raise BitallocError(f"{field}.bits", f"missing or not an integer; allowed: {_allowed_bits()}") from None
        if bits == KEEP_BITS:
            return cls(bits, scale_dtype=data.get("scale_dtype") or "float16")
        return cls(bits, data.get("group_size"), bool(data.get("symmetric", False)), data.get("scale_dtype", "float16"))


def _allowed_bits() -> str:
    return ", ".join(map(str, QUANT_BITS + (KEEP_BITS,)))


def validate_format(fmt: Format, field: str) -> None:
    if fmt.bits not in QUANT_BITS and fmt.bits != KEEP_BITS:
        raise BitallocError(f"{field}.bits", f"{fmt.bits} is not allowed; allowed: {_allowed_bits()}")
    if not fmt.quantized:
        if fmt.scale_dtype not in ("float16", "bfloat16"):
            raise BitallocError(f"{field}.scale_dtype", "16-bit weights are stored as float16 or bfloat16")
        return
    if (not isinstance(fmt.group_size, int) or isinstance(fmt.group_size, bool)
            or not 1 <= fmt.group_size <= MAX_GROUP_SIZE):
        raise BitallocError(f"{field}.group_size", f"{fmt.group_size!r} is not allowed; use an integer from 1 to "
                                                   f"{MAX_GROUP_SIZE}, e.g. 32, 64, 128")
    if fmt.scale_dtype not in SCALE_DTYPES:
        raise BitallocError(f"{field}.scale_dtype", f"{fmt.scale_dtype!r} is not allowed; allowed: {', '.join(SCALE_DTYPES)}")


def weight_bytes(out_features: int, in_features: int, fmt: Format) -> int:
    """Exact bytes to store one [out, in] weight: packed codes + scales + zero points."""
    if not fmt.quantized:
        return out_features * in_features * 2
    codes = out_features * math.ceil(in_features * fmt.bits / 32) * 4
    groups = out_features * math.ceil(in_features / fmt.group_size)
    per_group = SCALE_DTYPES[fmt.scale_dtype] * (1 if fmt.symmetric else 2)
    return codes + groups * per_group
