"""GPTQ (Frantar et al., 2022): quantize a layer's columns in turn, each column's rounding error pushed onto the
columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2 XᵀX / n.

The grid is GPTQ's own, as GPTQModel stores it: per group, asymmetric scale = (max - min) / (2^b - 1) over a range
that contains 0, an integer zero point z = round(-min / scale), w = (q - z) * scale; symmetric z = 2^(b-1) and
scale = 2 max|w| / (2^b - 1). Scales are rounded to the format's scale dtype before codes are taken. Group
parameters come from the weights as updated so far when the group's first column is reached (GPTQModel's default);
with `act_order` (columns by decreasing Hessian diagonal) they come from the original weights instead ("static
groups"), so every group stays a run of consecutive input columns — the grouped layout every kernel reads. A caller
may fix them beforehand (`grid`): llm-compressor takes them from its observer on the original weights, whatever the
order.
"""

from __future__ import annotations

import torch
from pydantic import Field

from bitalloc.formats import Format
from bitalloc.kernels.packed import PackedWeight, pack
from bitalloc.kernels.rtn import TORCH_DTYPES, QuantizedWeight
from bitalloc.registry import Params

from .base import QuantizerBase, register
from .layouts import CompressedTensors, GPTQCheckpoint


def _grid(w: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point [rows] for a group's columns w [rows, n]."""
    maxq = 2**fmt.bits - 1
    lo = w.amin(1).clamp(max=0)
    hi = w.amax(1).clamp(min=0)
    if fmt.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    span = hi - lo
    scale = torch.where(span == 0, torch.ones_like(span), span / maxq).to(TORCH_DTYPES[fmt.scale_dtype]).float()
    zero = (torch.full_like(scale, (maxq + 1) // 2) if fmt.symmetric
            else torch.round(-lo / scale).clamp(0, maxq))
    return scale, zero


def static_grid(weight: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's scale and integer zero point [rows, groups] from the weights as they are."""
    w = weight.detach().float()
    parts = [_grid(w[:, g:g + fmt.group_size], fmt) for g in range(0, w.shape[1], fmt.group_size)]
    return torch.stack([s for s, _ in parts], 1), torch.stack([z for _, z in parts], 1)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, damp: float = 0.01, act_order: bool = False,
         block: int = 128, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """(codes with scales and float zero terms -z*scale in the format's layout, the integer zero points)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    gs = fmt.group_size
    n_groups = -(-cols // gs)
    if grid is None and act_order:
        grid = static_grid(w, fmt)
    known = torch.full((n_groups,), grid is not None)
    scales, zeros = ((grid[0].float().clone(), grid[1].float().clone()) if grid is not None
                     else (torch.zeros(rows, n_groups), torch.zeros(rows, n_groups)))
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    maxq = 2**fmt.bits - 1
    codes = torch.zeros(rows, cols)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not known[g]:  # without act_order columns come in order: col is the group's first
                scales[:, g], zeros[:, g] = _grid(torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :min(gs, cols - col)], fmt)
                known[g] = True
            q = torch.clamp(torch.round(w1[:, i] / scales[:, g]) + zeros[:, g], 0, maxq)
            codes[:, col] = q
            err = (w1[:, i] - (q - zeros[:, g]) * scales[:, g]) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return _level(codes, scales, zeros, fmt), zeros


def _level(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: Format) -> QuantizedWeight:
    """Unsigned codes over integer zero points as a level in the format's layout: symmetric codes shifted to signed,
    asymmetric ones with the float zero term -zero*scale."""
    sdt = TORCH_DTYPES[fmt.scale_dtype]
    if fmt.symmetric:
        shift = zeros.repeat_interleave(fmt.group_size, 1)[:, :codes.shape[1]]
        return QuantizedWeight((codes - shift).to(torch.int8), scales.to(sdt), None, fmt)
    return QuantizedWeight(codes.to(torch.uint8), scales.to(sdt), (-zeros * scales).to(sdt), fmt)


def round_to_grid(weight: torch.Tensor, fmt: Format) -> QuantizedWeight:
    """Round-to-nearest on GPTQ's integer grid (each group's range widened to hold 0; symmetric: scale
    max|w| / (2^(b-1) - 1/2) and zero point 2^(b-1); asymmetric: integer zero point), which is also
    compressed-tensors' grid: what llm-compressor's QuantizationModifier makes."""
    w = weight.detach().float()
    scales, zeros = static_grid(w, fmt)
    expand = lambda t: t.repeat_interleave(fmt.group_size, 1)[:, :w.shape[1]]  # noqa: E731
    codes = torch.clamp(torch.round(w / expand(scales)) + expand(zeros), 0, 2**fmt.bits - 1)
    return _level(codes, scales, zeros, fmt)


@register("gptq")
class GPTQ(QuantizerBase):
    """GPTQ from each layer's input Hessian on the calibration tokens, FP inputs, each layer on its own; stored as
    GPTQModel's checkpoint keeps it."""

    summary = "GPTQ against each layer's input Hessian (FP inputs, layer by layer), GPTQModel's grid"
    inputs = "hessian"
    layout = GPTQCheckpoint()

    class Params(Params):
        damp: float = Field(0.01, gt=0, lt=1, description="damping, a fraction of the mean Hessian diagonal")
        act_order: bool = False
        block: int = Field(128, ge=1, le=4096, description="columns updated together")

    def grid(self, weight, fmt):
        """Group scales and zero points fixed before GPTQ runs; None: GPTQModel's way (see `gptq`)."""
        return None

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        if inputs is None:  # an expert too few calibration tokens reached: the identity Hessian, i.e. data-free
            inputs = 2 * torch.eye(weight.shape[1])  # rounding on GPTQ's grid, no error carried between columns
        q, _ = gptq(weight, inputs, fmt, self.damp, self.act_order, self.block, grid=self.grid(weight, fmt))
        return pack(q)


@register("gptq-ct")
class GPTQCompressedTensors(GPTQ):
    """GPTQ as llm-compressor's GPTQModifier runs it: every group's scale and zero point fixed beforehand from the
    original weights (its observer), `act_order` its `actorder: weight`; stored as compressed-tensors'
    pack-quantized checkpoint keeps it: packed codes and scales (symmetric: no zero points, no g_idx)."""

    version = 2  # 1 took each group's grid from the GPTQ-updated weights, as GPTQModel does
    summary = "GPTQ as llm-compressor's GPTQModifier runs it (grid from the original weights), compressed-tensors' bytes"
    layout = CompressedTensors()

    def grid(self, weight, fmt):
        return static_grid(weight, fmt)
