"""Byte layouts: how a runtime stores a quantized [out, in] weight, and which row widths it can store.

A quantizer registers the layout its levels are stored in (`Quantizer.layout`), so a format's bytes and fit are
its method's layout's, counted exactly as that runtime stores codes, scales and zero points:

- `packed` (bitalloc's kernels; `rtn`, `clip`): each row of `in_features` codes packed into 32-bit words,
  ceil(in_features * bits / 32) words per row, so 3-bit packs 32 codes into 3 words with no wasted bits. A group
  size that does not divide `in_features` leaves a shorter last group in every row, with its own scale and zero
  point: ceil(in_features / group_size) groups per row.
- `compressed-tensors` (llm-compressor's pack-quantized checkpoint; `rtn-int`, `gptq-ct`): the packed layout's
  bytes (its `weight_packed` words are bitalloc's), plus the int64 [out, in] `weight_shape` it keeps per layer;
  whole groups only.
- `gptq` (GPTQModel, vLLM): the same packed codes, scale_dtype scales, zero points packed at `bits` bits into int32
  words per group row (stored for symmetric formats too), and an int32 group index per input column (`g_idx`);
  whole groups only.
- `hqq`: HQQ's bit-packing of [groups, group_size] codes (8/4/2 bits in bytes, 3 bits as 10 codes per int32) and
  a float16 scale and zero per group; whole groups, 2/3/4/8 bits.
- `ggml` (llama.cpp; `gguf`): the type's blocks, in_features / block_size per row (`quantizers.gguf.ggml`).
"""

from __future__ import annotations

import math
from typing import ClassVar

from bitalloc.errors import BitallocError

SCALE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class Layout:
    name: ClassVar[str] = "packed"
    whole_groups: ClassVar[bool] = False  # rows must hold whole groups
    bits: ClassVar[tuple[int, ...] | None] = None  # the bit widths it stores (None: every quantized width)

    def check(self, fmt, field: str) -> None:
        """A format this layout cannot store is a one-line error naming the field."""
        if self.bits is not None and fmt.bits not in self.bits:
            raise BitallocError(f"{field}.bits", f"{fmt.method} has no {fmt.bits}-bit format; allowed: "
                                                 f"{', '.join(map(str, self.bits))}")

    def fits(self, fmt, in_features: int) -> bool:
        return not self.whole_groups or in_features % fmt.group_size == 0

    def weight_bytes(self, out_features: int, in_features: int, fmt) -> int:
        codes = out_features * math.ceil(in_features * fmt.bits / 32) * 4
        groups = math.ceil(in_features / fmt.group_size)
        return codes + out_features * groups * SCALE_BYTES[fmt.scale_dtype] * (1 if fmt.symmetric else 2)


class CompressedTensors(Layout):
    name = "compressed-tensors"
    whole_groups = True

    def weight_bytes(self, out_features, in_features, fmt) -> int:
        return super().weight_bytes(out_features, in_features, fmt) + 16  # weight_shape: two int64


class GPTQCheckpoint(Layout):
    name = "gptq"
    whole_groups = True

    def weight_bytes(self, out_features, in_features, fmt) -> int:
        codes = out_features * math.ceil(in_features * fmt.bits / 32) * 4
        groups = math.ceil(in_features / fmt.group_size)
        zeros = math.ceil(out_features * fmt.bits / 32) * 4
        return codes + groups * (out_features * SCALE_BYTES[fmt.scale_dtype] + zeros) + in_features * 4


HQQ_BITS = (2, 3, 4, 8)  # what HQQ packs that bitalloc's codes also hold (it has 1-bit too)
HQQ_CODES_PER_UNIT = {8: (1, 1), 4: (2, 1), 2: (4, 1), 1: (8, 1), 3: (10, 4)}  # codes per unit, bytes per unit


class HQQPacked(Layout):
    name = "hqq"
    whole_groups = True
    bits = HQQ_BITS

    def weight_bytes(self, out_features, in_features, fmt) -> int:
        n = out_features * in_features // fmt.group_size
        per, unit = HQQ_CODES_PER_UNIT[fmt.bits]
        return math.ceil(n / per) * fmt.group_size * unit + n * 2 * 2


class GgmlBlocks(Layout):
    name = "ggml"

    def check(self, fmt, field: str) -> None:
        from .gguf.ggml import GGML_TYPES

        if fmt.ggml not in GGML_TYPES:
            raise BitallocError(f"{field}.ggml", f"{fmt.ggml!r} is not a llama.cpp type bitalloc reads (method "
                                                 f"gguf); allowed: {', '.join(GGML_TYPES)}")

    def fits(self, fmt, in_features: int) -> bool:
        from .gguf.ggml import GGML_TYPES

        return GGML_TYPES[fmt.ggml].fits(in_features)

    def weight_bytes(self, out_features, in_features, fmt) -> int:
        from .gguf.ggml import GGML_TYPES

        return out_features * GGML_TYPES[fmt.ggml].row_bytes(in_features)
