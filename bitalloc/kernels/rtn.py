"""Round-to-nearest grouped quantization of a [out, in] weight, vectorised in torch.

Groups run along the input dimension. When `group_size` does not divide `in`, each row ends
with one shorter group (in % group_size values) that has its own scale and zero point; nothing
is padded, so the tail's range is its own.

Asymmetric: scale = (max - min) / (2^b - 1), zero point = min, both rounded to `scale_dtype`
before the codes are taken (what is stored is what is used); w ≈ q * scale + zero, q in [0, 2^b).
Symmetric: scale = max|w| / (2^(b-1) - 1); w ≈ q * scale, q in [-2^(b-1), 2^(b-1)).
A constant group gets scale 1, so it dequantizes exactly to its value (asymmetric) or to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitalloc.formats import Format

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantizedWeight:
    """Integer codes [out, in] (uint8 asymmetric, int8 symmetric), scales and zero points [out, n_groups] (zeros None if symmetric)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: Format


def _split(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Views of w as [out, n, group] blocks: the full groups, then the shorter tail if any."""
    out, cols = w.shape
    full = cols // group_size
    parts = []
    if full:
        parts.append(w[:, : full * group_size].reshape(out, full, group_size))
    if cols % group_size:
        parts.append(w[:, full * group_size :].reshape(out, 1, cols % group_size))
    return parts


def _quantize_block(x: torch.Tensor, fmt: Format, shrink: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scales and zeros of [out, n, group] blocks over their min-max range, or that range multiplied by
    `shrink` ([out, n, 1]: a clipped range, whose outliers saturate)."""
    sdt = TORCH_DTYPES[fmt.scale_dtype]
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        top = x.abs().amax(-1, keepdim=True)
        scale = ((top if shrink is None else top * shrink) / qmax).to(sdt).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round(x / scale), -qmax - 1, qmax)
        return codes, scale, None
    levels = 2**fmt.bits - 1
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale = ((hi - lo) / levels).to(sdt).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = lo.to(sdt).float()
    codes = torch.clamp(torch.round((x - zero) / scale), 0, levels)
    return codes, scale, zero


def quantize(weight: torch.Tensor, fmt: Format, shrink: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a [out, in] weight; computed in float32 whatever the weight's dtype. `shrink` [out, n_groups]
    scales each group's range (a clipped range; see `group_errors`)."""
    if not fmt.quantized:
        raise ValueError("16-bit formats are not quantized; use fake_quantize")
    w = weight.detach().float()
    codes, scales, zeros = [], [], []
    for block, factor in zip(_split(w, fmt.group_size), _group_parts(shrink, fmt.group_size, w.shape[1])):
        c, s, z = _quantize_block(block, fmt, factor)
        codes.append(c.reshape(w.shape[0], -1))
        scales.append(s.squeeze(-1))
        if z is not None:
            zeros.append(z.squeeze(-1))
    code_dtype = torch.int8 if fmt.symmetric else torch.uint8
    return QuantizedWeight(
        codes=torch.cat(codes, 1).to(code_dtype),
        scales=torch.cat(scales, 1).to(TORCH_DTYPES[fmt.scale_dtype]),
        zeros=torch.cat(zeros, 1).to(TORCH_DTYPES[fmt.scale_dtype]) if zeros else None,
        fmt=fmt,
    )


def _group_parts(per_group: torch.Tensor | None, group_size: int, cols: int) -> list[torch.Tensor | None]:
    """A per-group tensor [out, n_groups] split as `_split` splits the columns, each as [out, n, 1]."""
    full = cols // group_size
    if per_group is None:
        return [None] * (bool(full) + bool(cols % group_size))
    parts = [per_group[:, :full, None]] if full else []
    if cols % group_size:
        parts.append(per_group[:, full:, None])
    return parts


def group_errors(weight: torch.Tensor, fmt: Format, shrink: float,
                 column_weight: torch.Tensor | None = None) -> torch.Tensor:
    """[out, n_groups] squared error of each group quantized over its range times `shrink`, each column's error
    weighted by `column_weight` [in] (e.g. the layer's input second moments) when given."""
    w = weight.detach().float()
    errors = []
    for block, (start, n) in zip(_split(w, fmt.group_size), _spans(w.shape[1], fmt.group_size)):
        factor = torch.full((block.shape[0], block.shape[1], 1), shrink)
        c, s, z = _quantize_block(block, fmt, factor)
        err = (block - (c * s if z is None else c * s + z)).pow(2)
        if column_weight is not None:
            err = err * column_weight[start:start + n * block.shape[2]].float().reshape(1, n, -1)
        errors.append(err.sum(-1))
    return torch.cat(errors, 1)


def _spans(cols: int, group_size: int) -> list[tuple[int, int]]:
    """(first column, group count) of each part `_split` makes."""
    full = cols // group_size
    return ([(0, full)] if full else []) + ([(full * group_size, 1)] if cols % group_size else [])


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     group_size: int) -> torch.Tensor:
    """Signed (symmetric) or unsigned codes [out, in] -> float32 weight: code x scale, then + zero, each rounded in
    float32, group by group (the full groups, then the shorter tail), as `fake_quantize` computes it."""
    rows, start, blocks = codes.shape[0], 0, []
    for block in _split(codes, group_size):
        n = block.shape[1]
        w = block.float() * scales[:, start:start + n, None].float()
        if zeros is not None:
            w = w + zeros[:, start:start + n, None].float()
        blocks.append(w.reshape(rows, -1))
        start += n
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_codes(q.codes, q.scales, q.zeros, q.fmt.group_size).to(dtype)


def fake_quantize(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Quantize then dequantize, returned in the weight's dtype; the fast path used by the evaluator."""
    if not fmt.quantized:
        return weight.detach().to(TORCH_DTYPES[fmt.scale_dtype]).to(weight.dtype)
    w = weight.detach().float()
    blocks = []
    for block in _split(w, fmt.group_size):
        c, s, z = _quantize_block(block, fmt)
        deq = c * s if z is None else c * s + z
        blocks.append(deq.reshape(w.shape[0], -1))
    return torch.cat(blocks, 1).to(weight.dtype)
