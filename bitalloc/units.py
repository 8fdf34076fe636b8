"""Byte sizes as users write them (`80MiB`, `1.2GB`, `123456B`) and as we print them."""

import re

from .errors import BitallocError

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*$")
MAX_BYTES = 2**60  # an exabyte: larger is a typo, not a memory budget


def parse_bytes(text: str, field: str) -> int:
    """`80MiB` -> 83886080. A unit is required so that sizes are never mistaken for bit widths."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise BitallocError(
            field, f"{text!r} is not a size; write a number with a unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 80MiB"
        )
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size > MAX_BYTES:
        raise BitallocError(field, f"{text!r} is larger than any machine's memory or disk")
    return int(size)


def mib(n_bytes: int) -> float:
    return n_bytes / 2**20


def bytes_at_avg_bits(avg_bits: float, quantized_params: int, other_bytes: int) -> int:
    """Whole-model bytes at an average bit width over the quantized layers (how budgets in bits are read)."""
    return other_bytes + int(avg_bits * float(quantized_params) / 8.0)
