"""Clip search: round-to-nearest over the per-group range (shrunk from min-max) of least squared error, each input
column weighted by its mean squared input on the calibration tokens (AWQ's and llama.cpp's clip searches)."""

from __future__ import annotations

import torch
from pydantic import Field

from bitalloc.kernels.packed import PackedWeight, pack
from bitalloc.kernels.rtn import group_errors, quantize
from bitalloc.registry import Params

from .base import QuantizerBase, register
from .inputs import Kind


@register("clip")
class ClipSearch(QuantizerBase):
    """Per group, the range min-max x a for a in 1, 1 - 1/grid, ... down to 1 - max_shrink, of least squared error
    (weighted by the input second moments when `weighted`); a = 1 is min-max itself, so the error never grows."""

    summary = "round-to-nearest over the clipped range of least (input-weighted) squared error, per group"

    class Params(Params):
        grid: int = Field(20, ge=1, le=1000, description="steps between min-max and 1 - max_shrink")
        max_shrink: float = Field(0.5, gt=0, lt=1, description="the largest share the range is shrunk by")
        weighted: bool = True

    @property
    def inputs(self) -> Kind | None:
        return "diagonal" if self.weighted else None

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        best_err = group_errors(weight, fmt, 1.0, inputs)
        best = torch.ones_like(best_err)
        for step in range(1, int(self.grid * self.max_shrink) + 1):
            factor = 1 - step / self.grid
            err = group_errors(weight, fmt, factor, inputs)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, factor), best)
        return pack(quantize(weight, fmt, shrink=best))
