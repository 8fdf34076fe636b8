"""Second moments of each layer's inputs on the calibration tokens: what GPTQ (the full XᵀX) and weighted clip
searches (its diagonal) quantize against.

One forward pass per calibration sequence, the FP model throughout (each layer sees FP inputs, as EvoPress's
level database is made: levels are independent per layer). Layers that read the same tensor (q, k and v; gate
and up) share one accumulator.
"""

from __future__ import annotations

from typing import Literal

import torch

from bitalloc.hooks import module_hooks
from bitalloc.model import LoadedModel, QuantizableLayer

Kind = Literal["diagonal", "hessian"]


def input_bytes(layers: list[QuantizableLayer], kind: Kind) -> int:
    """Bytes the accumulators hold at most (float32; layers reading one tensor counted apart: an upper bound)."""
    return sum(4 * (l.in_features ** 2 if kind == "hessian" else l.in_features) for l in layers)


@torch.no_grad()
def collect(model: LoadedModel, layers: list[QuantizableLayer], tokens: torch.Tensor, kind: Kind
            ) -> dict[str, torch.Tensor]:
    """Per layer: 2 XᵀX / n ([in, in], `hessian`) or mean x² per input column ([in], `diagonal`), float32 on CPU.
    A layer called on the very tensor the previous layer was (q, k, v) shares that layer's accumulator."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    last: list = [None, None]  # the input tensor the previous hooked layer saw, and that layer

    def hook(name: str, x: torch.Tensor) -> None:
        if last[0] is x:
            alias[name] = last[1]
            return
        last[0], last[1] = x, name
        alias[name] = name
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        part = (2 * flat.t() @ flat if kind == "hessian" else flat.pow(2).sum(0)).cpu()
        sums[name] = sums[name] + part if name in sums else part
        counts[name] = counts.get(name, 0) + flat.shape[0]

    with module_hooks(model, [l.name for l in layers], pre=lambda name, _m, args: hook(name, args[0])):
        for seq in tokens:
            model.module(seq.unsqueeze(0))
            last[0] = last[1] = None
    means = {owner: total / counts[owner] for owner, total in sums.items()}  # one tensor per input, shared
    return {l.name: means[alias[l.name]] for l in layers}
