"""The packed weight format, and its torch reference `pack` / `unpack`.

Layout of one [out, in] weight at `bits` b (any of 2, 3, 4, 5, 6, 8):

- `qweight` int32 [out, ceil(in * b / 32)]: each row is one little-endian bit stream. Code k of a row
  occupies stream bits [k*b, (k+1)*b); stream bit j is bit j % 32 of word j // 32. A code that crosses
  a word boundary (3, 5 and 6 bits) keeps its low bits at the top of word j // 32 and its high bits at
  the bottom of the next word, so 3-bit packs 32 codes into exactly 3 words and nothing is wasted.
  Codes are unsigned: asymmetric q in [0, 2^b); symmetric q + 2^(b-1), so [-2^(b-1), 2^(b-1)) fits too.
- `scales` [out, ceil(in / group_size)] in the format's scale dtype (fp16 by default), one per group along
  the row; a last, shorter group when group_size does not divide in.
- `zeros` the same shape (asymmetric only): w = q * scale + zero; symmetric: w = (u - 2^(b-1)) * scale.

These are exactly the bytes `bitalloc.formats.weight_bytes` counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitalloc.formats import Format

from .rtn import QuantizedWeight, quantize

_MASK32 = (1 << 32) - 1


@dataclass
class PackedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: Format
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def to(self, device) -> "PackedWeight":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PackedWeight(move(self.qweight), move(self.scales), move(self.zeros), self.fmt, self.in_features)


def words_per_row(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 32)


def _positions(in_features: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(in_features, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [out, in] (< 2^bits) -> int32 words [out, ceil(in * bits / 32)]."""
    out, cols = codes.shape
    n_words = words_per_row(cols, bits)
    word, shift = _positions(cols, bits, codes.device)
    u = codes.to(torch.int64)
    # disjoint bit ranges, so adding the pieces is OR-ing them; one spare word catches the spill of the last code
    acc = torch.zeros(out, n_words + 1, dtype=torch.int64, device=codes.device)
    acc.scatter_add_(1, word.expand(out, cols), (u << shift) & _MASK32)
    acc.scatter_add_(1, (word + 1).expand(out, cols), u >> (32 - shift))
    acc = acc[:, :n_words]
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 words -> unsigned codes [out, in] as int64 (the exact inverse of `pack_codes`)."""
    word, shift = _positions(in_features, bits, qweight.device)
    w = qweight.to(torch.int64) & _MASK32
    padded = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
    lo = padded[:, word] >> shift
    hi = padded[:, word + 1] << (32 - shift)
    return (lo | hi) & ((1 << bits) - 1)


def offset(fmt: Format) -> int:
    """What is added to a symmetric code to make it unsigned."""
    return 2 ** (fmt.bits - 1) if fmt.symmetric else 0


def pack(q: QuantizedWeight) -> PackedWeight:
    codes = q.codes.to(torch.int64) + offset(q.fmt)
    return PackedWeight(pack_codes(codes, q.fmt.bits), q.scales, q.zeros, q.fmt, q.codes.shape[1])


def unpack(p: PackedWeight) -> QuantizedWeight:
    codes = unpack_codes(p.qweight, p.fmt.bits, p.in_features) - offset(p.fmt)
    return QuantizedWeight(codes.to(torch.int8 if p.fmt.symmetric else torch.uint8), p.scales, p.zeros, p.fmt)


def pack_weight(weight: torch.Tensor, fmt: Format) -> PackedWeight:
    """Quantize a [out, in] weight with the reference quantizer and pack it."""
    return pack(quantize(weight, fmt))


def dequantize_packed(p: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weight from packed storage, in torch: the CPU path and the kernels' reference."""
    from .rtn import dequantize

    return dequantize(unpack(p), dtype)
