"""`QuantEmbedding`: a token embedding whose [vocab, hidden] table lives packed row by row (see `packed`), as
llama.cpp stores `token_embd`: a lookup unpacks and dequantizes only the looked-up rows, so the table is never held
in float. A head tied to it is a `QuantLinear` over the same buffers (`tie_head`), stored once."""

from __future__ import annotations

import torch
from torch import nn

from bitalloc.formats import Format

from .packed import PackedWeight, dequantize_packed
from .quant_linear import QuantLinear, register_packed


class QuantEmbedding(nn.Module):
    """Rows of W [vocab, hidden] packed at `fmt`; `embed_scale` (Gemma's √hidden) multiplies a looked-up row, as the
    embedding it replaces did."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: Format, dtype: torch.dtype,
                 embed_scale: float | None = None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt, self.dtype = num_embeddings, embedding_dim, fmt, dtype
        self.embed_scale = embed_scale
        register_packed(self, num_embeddings, embedding_dim, fmt, device)

    @classmethod
    def replacing(cls, embedding: nn.Embedding, fmt: Format, device=None) -> "QuantEmbedding":
        """An empty packed table standing in for `embedding` (its shape, dtype and scale)."""
        scale = getattr(embedding, "embed_scale", None)
        return cls(embedding.num_embeddings, embedding.embedding_dim, fmt, embedding.weight.dtype,
                   None if scale is None else float(scale), device=device)

    @classmethod
    def swap_in(cls, root: nn.Module, name: str, packed: PackedWeight) -> nn.Module:
        """Replace the embedding `name` under `root` by a QuantEmbedding over `packed`; returns the one replaced."""
        module = root.get_submodule(name)
        layer = cls.replacing(module, packed.fmt, device=packed.qweight.device)
        layer.qweight, layer.scales, layer.zeros = packed.qweight, packed.scales, packed.zeros
        root.set_submodule(name, layer)
        return module

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.fmt, self.embedding_dim)

    def tie_head(self, root: nn.Module, head: str) -> None:
        """Make the Linear `head` under `root` a QuantLinear over this table's buffers (one tensor, two uses)."""
        root.set_submodule(head, QuantLinear.from_packed(self.packed, root.get_submodule(head).bias, self.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = PackedWeight(self.qweight.index_select(0, flat), self.scales.index_select(0, flat),
                            None if self.zeros is None else self.zeros.index_select(0, flat), self.fmt,
                            self.embedding_dim)
        out = dequantize_packed(rows, self.dtype)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)
