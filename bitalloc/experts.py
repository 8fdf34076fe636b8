"""Mixture-of-experts blocks as units of the search.

transformers 5 keeps a block's experts as fused 3-D parameters (`gate_up_proj` [experts, 2·inter, hidden] and
`down_proj` [experts, hidden, inter]; transposed, interleaved and with biases for gpt-oss), described by the
attributes its `use_experts_implementation` decorator sets (`is_transposed`, `is_concatenated`, `has_gate`,
`has_bias`). A unit is one projection of one block over all its experts — gate, up and down apart, as llama.cpp
stores them (`blk.N.ffn_gate_exps`, one type per tensor) and fused-MoE kernels run them — named
`<experts module>.gate_proj` / `.up_proj` / `.down_proj`, the names per-expert checkpoints give without the expert
index. Biases and routers stay as they are. Older and custom architectures whose experts are `nn.Linear` modules
(`experts.N.gate_proj`) are listed layer by layer and tied per projection (`expert_ties`).

Expert e of a unit reads only the tokens routed to it: `routed_inputs` recomputes, from the arguments the experts
module is called with, what each expert's projection sees (what GPTQ, clip and sqnr calibrate against).
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# a Linear that routes tokens (or gates a shared expert) is never quantized: a few kB whose errors move every token
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")
_PER_EXPERT = re.compile(r"^(?P<block>(?:.*\.)?experts)\.(?P<index>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")


def is_fused_experts(module: nn.Module) -> bool:
    return (hasattr(module, "is_transposed") and isinstance(getattr(module, "down_proj", None), nn.Parameter)
            and getattr(module, "down_proj").dim() == 3)


def fused_units(name: str, module: nn.Module) -> Iterator[dict]:
    """The units of one fused experts module, as QuantizableLayer fields."""
    transposed = bool(module.is_transposed)
    down = module.down_proj
    experts = int(down.shape[0])
    hidden, inter = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    common = dict(experts=experts, module=name, transposed=transposed, dtype=str(down.dtype).removeprefix("torch."))
    if getattr(module, "has_gate", True) and isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
        # concatenated [gate; up] halves, or interleaved gate0, up0, gate1, ...
        starts = ((0, 1), (inter, 1)) if getattr(module, "is_concatenated", True) else ((0, 2), (1, 2))
        for proj, rows in zip(("gate_proj", "up_proj"), starts):
            yield dict(name=f"{name}.{proj}", in_features=int(hidden), out_features=int(inter), param="gate_up_proj",
                       rows=rows, **common)
    else:
        yield dict(name=f"{name}.up_proj", in_features=int(hidden), out_features=int(inter), param="up_proj",
                   **common)
    yield dict(name=f"{name}.down_proj", in_features=int(inter), out_features=int(hidden), param="down_proj",
               **common)


def is_router(name: str, model: nn.Module) -> bool:
    """A module beside an experts module, named as routers are (`gate`, `router`, `shared_expert_gate`)."""
    if not _ROUTER.search(name):
        return False
    parent = model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
    return hasattr(parent, "experts")


def expert_ties(names: list[str]) -> list[tuple[int, ...]]:
    """Per-expert Linear layers of one block and projection (`….experts.N.gate_proj`) share one format: runtimes
    store a block's experts of a projection as one tensor of one type."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, name in enumerate(names):
        m = _PER_EXPERT.match(name)
        if m:
            groups.setdefault((m["block"], m["proj"]), []).append(i)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def _route(args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [tokens, hidden], expert index per token and slot [tokens, top_k]) from an experts module's call
    `experts(hidden_states, top_k_index, top_k_weights)`, positional as every transformers MoE block calls it."""
    values = list(args) + list(kwargs.values())
    hidden = values[0].reshape(-1, values[0].shape[-1])
    return hidden, values[1].reshape(hidden.shape[0], -1)


@torch.no_grad()
def routed_inputs(module: nn.Module, args, kwargs) -> dict[str, list[torch.Tensor | None]]:
    """Per projection, per expert: the inputs its rows read on this call ([tokens routed, in]; None where no token
    went to the expert). gate/up read the routed hidden states; down reads the gated intermediate, computed as the
    module computes it (`_apply_gate`, biases included), from its current weights."""
    hidden, index = _route(args, kwargs)
    transposed = bool(module.is_transposed)
    fused_gate = getattr(module, "has_gate", True) and isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
    first = module.gate_up_proj if fused_gate else module.up_proj
    bias = getattr(module, ("gate_up_proj" if fused_gate else "up_proj") + "_bias", None)
    out: dict[str, list] = {p: [] for p in (PROJECTIONS if fused_gate else PROJECTIONS[1:])}
    for e in range(module.down_proj.shape[0]):
        tokens = (index == e).any(-1).nonzero().flatten()
        if not len(tokens):
            for values in out.values():
                values.append(None)
            continue
        x = hidden[tokens]
        h = x @ (first[e] if transposed else first[e].t())
        if bias is not None:
            h = h + bias[e]
        h = module._apply_gate(h) if fused_gate else module.act_fn(h)
        for proj in out:
            out[proj].append(h if proj == "down_proj" else x)
    return out
