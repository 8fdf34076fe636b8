"""Packed mixture-of-experts blocks: a transformers 5 experts module whose fused 3-D projections live packed.

Each projection of the block (gate, up, down: the search's units, `bitalloc.experts`) is a `PackedProjection`, its
experts' rows stacked expert after expert as its level stores them, or — where that unit is not quantized — a float
[experts, out, in] parameter of the same name. The module keeps its own class for everything else (its gate
function, activation, biases, post-expert norm), with a forward that runs each routed expert's projections through
the packed kernels (`packed_linear`) and rebuilds the fused [gate; up] (or interleaved) layout its `_apply_gate`
reads, so any architecture the experts decorator describes (Mixtral, Qwen MoE, gpt-oss) runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from bitalloc.experts import fused_units
from bitalloc.formats import Format

from .packed import PackedWeight
from .quant_linear import FallsBack, packed_linear, register_packed


class PackedProjection(FallsBack, nn.Module):
    """One projection of a block's experts, [experts, out, in] packed at `fmt` as [experts·out, in]."""

    def __init__(self, experts: int, out_features: int, in_features: int, fmt: Format, device=None):
        super().__init__()
        self.experts, self.out_features, self.in_features, self.fmt = experts, out_features, in_features, fmt
        register_packed(self, experts * out_features, in_features, fmt, device)

    @classmethod
    def of(cls, packed: PackedWeight, experts: int) -> "PackedProjection":
        module = cls(experts, packed.out_features // experts, packed.in_features, packed.fmt,
                     device=packed.qweight.device)
        module.qweight, module.scales, module.zeros = packed.qweight, packed.scales, packed.zeros
        return module

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.fmt, self.in_features)

    def expert(self, e: int) -> PackedWeight:
        rows = slice(e * self.out_features, (e + 1) * self.out_features)
        return PackedWeight(self.qweight[rows], self.scales[rows], None if self.zeros is None else self.zeros[rows],
                            self.fmt, self.in_features)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, out={self.out_features}, in={self.in_features}, format={self.fmt.name}"

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return packed_linear(x, self.expert(e), self._fallback)


class QuantExperts:
    """Mixed into an experts module's own class (`swap_in`): its projections as `PackedProjection`s (or float
    [experts, out, in] parameters), its forward the eager loop over routed experts."""

    @staticmethod
    def swap_in(root: nn.Module, name: str, weights: dict[str, PackedWeight | torch.Tensor]) -> nn.Module:
        """Make the experts module `name` under `root` compute with `weights`: per projection (gate_proj, up_proj,
        down_proj) a packed level or a float [experts, out, in] tensor. Returns the module, changed in place."""
        module = root.get_submodule(name)
        if isinstance(module, QuantExperts):
            raise ValueError(f"{name} is packed already")
        units = list(fused_units(name, module))  # the search's units of this block
        names = tuple(u["name"].rpartition(".")[2] for u in units)
        if set(weights) != set(names):
            raise ValueError(f"{name}: the projections are {names}, not {sorted(weights)}")
        experts = units[0]["experts"]
        for param in ("gate_up_proj", "up_proj", "down_proj"):
            module._parameters.pop(param, None)
        for proj in names:
            w = weights[proj]
            if isinstance(w, PackedWeight):
                setattr(module, proj, PackedProjection.of(w, experts))
            else:
                module.register_parameter(proj, nn.Parameter(w.contiguous(), requires_grad=False))
        module.is_transposed = False  # its float projections are [experts, out, in] now, whatever the model stored
        module.__class__ = _quant_class(type(module))
        return module

    def _project(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, proj)
        return w(x, e) if isinstance(w, PackedProjection) else x @ w[e].to(x.dtype).t()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        top_k_index = top_k_index.reshape(hidden_states.shape[0], -1)
        top_k_weights = top_k_weights.reshape(hidden_states.shape[0], -1)
        out = torch.zeros_like(hidden_states)
        experts = self.down_proj.experts if isinstance(self.down_proj, PackedProjection) else self.down_proj.shape[0]
        bias = getattr(self, "has_bias", False)
        gated = "gate_proj" in self._modules or "gate_proj" in self._parameters
        for e in top_k_index.unique().tolist():
            if e >= experts:  # expert-parallel sentinels
                continue
            tokens, slot = torch.where(top_k_index == e)
            x = hidden_states[tokens]
            if gated:
                gate, up = self._project("gate_proj", e, x), self._project("up_proj", e, x)
                h = torch.cat([gate, up], -1) if getattr(self, "is_concatenated", True) else \
                    torch.stack([gate, up], -1).flatten(-2)
                h = self._apply_gate(h + self.gate_up_proj_bias[e] if bias else h)
            else:
                h = self._project("up_proj", e, x)
                h = self.act_fn(h + self.up_proj_bias[e] if bias else h)
            y = self._project("down_proj", e, h)
            y = y + self.down_proj_bias[e] if bias else y
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out.reshape(shape)


_CLASSES: dict[type, type] = {}


def _quant_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantExperts, cls), {})
    return _CLASSES[cls]
