"""Second moments of each layer's inputs on the calibration tokens: what GPTQ (the full XᵀX) and weighted clip
searches (its diagonal) quantize against.

One forward pass per calibration sequence, the FP model throughout (each layer sees FP inputs, as EvoPress's
level database is made: levels are independent per layer). Layers that read the same tensor (q, k and v; gate
and up) share one accumulator. An expert unit has one accumulator per expert, over the tokens routed to it
(`experts.routed_inputs`); an expert that saw fewer than `MIN_ROUTED` tokens gets None — quantized data-free —
and is counted in `data_free`. A token embedding's lookup multiplies nothing (a token's row is its output, every
column alike): it has no input moments (None, quantized unweighted), unless a head is tied to it, whose inputs
(the final hidden states) it then takes.
"""

from __future__ import annotations

from typing import Literal

import torch

from bitalloc.experts import routed_inputs
from bitalloc.hooks import module_hooks
from bitalloc.model import LoadedModel, QuantizableLayer

Kind = Literal["diagonal", "hessian"]
MIN_ROUTED = 16  # calibration tokens an expert needs before its inputs shape its level


def input_bytes(layers: list[QuantizableLayer], kind: Kind) -> int:
    """Bytes the accumulators hold at most (float32; layers reading one tensor counted apart: an upper bound)."""
    return sum(4 * max(l.experts, 1) * (l.in_features ** 2 if kind == "hessian" else l.in_features) for l in layers)


def _moment(flat: torch.Tensor, kind: Kind) -> torch.Tensor:
    flat = flat.detach().reshape(-1, flat.shape[-1]).float()
    return (2 * flat.t() @ flat if kind == "hessian" else flat.pow(2).sum(0)).cpu()


@torch.no_grad()
def collect(model: LoadedModel, layers: list[QuantizableLayer], tokens: torch.Tensor, kind: Kind
            ) -> dict[str, torch.Tensor | list[torch.Tensor | None]]:
    """Per layer: 2 XᵀX / n ([in, in], `hessian`) or mean x² per input column ([in], `diagonal`), float32 on CPU;
    per expert unit a list of these, one per expert. A layer called on the very tensor the previous layer was
    (q, k, v) shares that layer's accumulator."""
    plain = [l for l in layers if not l.experts and not (l.embedding and not l.head)]
    names = {l.head if l.embedding else l.name: l.name for l in plain}  # hooked module -> unit (a tied head's input)
    units: dict[str, list[QuantizableLayer]] = {}
    for l in layers:
        if l.experts:
            units.setdefault(l.module_name, []).append(l)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    expert_sums: dict[str, list] = {l.name: [None] * l.experts for us in units.values() for l in us}
    expert_counts: dict[str, list[int]] = {l.name: [0] * l.experts for us in units.values() for l in us}
    last: list = [None, None]  # the input tensor the previous hooked layer saw, and that layer

    def hook(name: str, x: torch.Tensor) -> None:
        if last[0] is x:
            alias[name] = last[1]
            return
        last[0], last[1] = x, name
        alias[name] = name
        part = _moment(x, kind)
        sums[name] = sums[name] + part if name in sums else part
        counts[name] = counts.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]

    def expert_hook(module_name: str, module, args, kwargs) -> None:
        inputs = routed_inputs(module, args, kwargs)
        for l in units[module_name]:
            for e, x in enumerate(inputs[l.projection]):
                if x is None:
                    continue
                part = _moment(x, kind)
                held = expert_sums[l.name][e]
                expert_sums[l.name][e] = part if held is None else held + part
                expert_counts[l.name][e] += x.shape[0]

    with module_hooks(model, list(names), pre=lambda module, _m, args: hook(names[module], args[0])), \
            module_hooks(model, list(units), pre=expert_hook, with_kwargs=True):
        for seq in tokens:
            model.module(seq.unsqueeze(0))
            last[0] = last[1] = None
    means = {owner: total / counts[owner] for owner, total in sums.items()}  # one tensor per input, shared
    out: dict = {l.name: means[alias[l.name]] for l in plain}
    out.update({l.name: None for l in layers if l.embedding and not l.head})
    for name, per_expert in expert_sums.items():
        out[name] = [None if n < MIN_ROUTED else total / n for total, n in zip(per_expert, expert_counts[name])]
    return out


def data_free(stats: dict, layers: list[QuantizableLayer]) -> tuple[int, int]:
    """(experts quantized without their inputs for too few routed tokens, experts in all), over expert units."""
    experts = [l for l in layers if l.experts and l.name in stats]
    return sum(x is None for l in experts for x in stats[l.name]), sum(l.experts for l in experts)
