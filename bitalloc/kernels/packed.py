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
import torch.nn.functional as F

from bitalloc.formats import Format

from .rtn import QuantizedWeight, dequantize_codes, quantize

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

    @classmethod
    def empty(cls, fmt: Format, out_features: int, in_features: int, device="meta") -> "PackedWeight":
        """A level's tensors without values (on the meta device by default): its shapes and bytes."""
        from .rtn import TORCH_DTYPES

        groups = -(-in_features // fmt.group_size)
        dtype = TORCH_DTYPES[fmt.scale_dtype]
        return cls(torch.empty(out_features, words_per_row(in_features, fmt.bits), dtype=torch.int32, device=device),
                   torch.empty(out_features, groups, dtype=dtype, device=device),
                   None if fmt.symmetric else torch.empty(out_features, groups, dtype=dtype, device=device),
                   fmt, in_features)

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
    """int32 words -> unsigned codes [out, in] (int32 or int64; the exact inverse of `pack_codes`).

    Fast enough to run on every forward pass (streamed evaluation): 2, 4 and 8 bits divide a word, so each code is
    one shift of its word; 3, 5 and 6 bits are read eight codes at a time, since eight codes fill whole bytes
    (`bits` of them) and fit one int32 (3 bits) or int64 (5, 6 bits) — the stream is little-endian, so its bytes
    are the words' bytes in memory order."""
    out = qweight.shape[0]
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int32, device=qweight.device) * bits
        codes = (qweight.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(out, -1)[:, :in_features]
    stream = qweight.contiguous().view(torch.uint8)
    blocks = -(-in_features // 8)
    need = blocks * bits
    if stream.shape[1] != need:
        stream = F.pad(stream, (0, need - stream.shape[1])) if stream.shape[1] < need else stream[:, :need]
    width, dtype = (4, torch.int32) if bits <= 3 else (8, torch.int64)
    words = F.pad(stream.reshape(out, blocks, bits), (0, width - bits)).view(dtype)
    codes = (words >> (torch.arange(8, dtype=dtype, device=qweight.device) * bits)) & mask
    return codes.reshape(out, blocks * 8)[:, :in_features]


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
    """[out, in] weight from packed storage, in torch: the CPU path and the kernels' reference. Equal, bit for bit,
    to `rtn.dequantize` of the unpacked codes (code x scale, then + zero, each rounded in float32). Rows are done a
    block at a time, so the temporaries stay in cache however large the layer (a whole 8192 x 2048 layer's
    temporaries at once made it ten times slower per weight)."""
    out = torch.empty(p.out_features, p.in_features, dtype=dtype, device=p.qweight.device)
    step = max(1, _BLOCK_ELEMENTS // max(p.in_features, 1))
    for start in range(0, p.out_features, step):
        rows = slice(start, start + step)
        codes = unpack_codes(p.qweight[rows], p.fmt.bits, p.in_features)
        if p.fmt.symmetric:
            codes = codes - offset(p.fmt)
        out[rows] = dequantize_codes(codes, p.scales[rows], None if p.zeros is None else p.zeros[rows],
                                     p.fmt.group_size)
    return out


_BLOCK_ELEMENTS = 1 << 19
