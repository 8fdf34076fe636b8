"""verify for bitalloc's runtime: the point written as `bitalloc pack` writes it, loaded back by `load_packed`, each
QuantLinear's, QuantEmbedding's and experts' PackedProjection's packed weight dequantized, measured and compared with
the job's levels (`points.weights_point`)."""

from __future__ import annotations

from pathlib import Path

from bitalloc.kernels.packed import dequantize_packed
from bitalloc.kernels.quant_embedding import QuantEmbedding
from bitalloc.kernels.quant_experts import PackedProjection
from bitalloc.kernels.quant_linear import QuantLinear

from ..points import weights_point
from .checkpoint import load_packed, pack


def verify(ws, picked, work: Path, stages) -> list:
    with stages.stage("bitalloc: pack and load the checkpoint"):
        folder = work / "packed"
        pack(picked.config, folder, picked.front.data.hash)
        loaded = load_packed(folder)
    dtype = next(ws.model.module.parameters()).dtype
    modules = dict(loaded.module.named_modules())
    tables = {m.qweight.data_ptr() for m in modules.values() if isinstance(m, QuantEmbedding)}
    packed = {name: m for name, m in modules.items() if isinstance(m, (QuantEmbedding, PackedProjection))
              or (isinstance(m, QuantLinear) and m.qweight.data_ptr() not in tables)}  # a tied head: its table's
    weights = {name: _weight(m, dtype) for name, m in packed.items()}
    with stages.stage("bitalloc: measure"):
        point = weights_point("bitalloc", ws, picked, weights, {n: m.packed.nbytes for n, m in packed.items()},
                              sorted(p for p in folder.rglob("*") if p.is_file()))
    if picked.front.model.bytes_of == "bitalloc":  # the front counts this folder's bytes: how close it came
        point.details["front_minus_folder_bytes"] = float(picked.point.bytes - point.file_bytes)
    return [point]


def _weight(module, dtype):
    """A packed module's weight as the job's levels give it ([experts, out, in] for an experts projection)."""
    w = dequantize_packed(module.packed, dtype)
    return w.reshape(module.experts, -1, w.shape[-1]) if isinstance(module, PackedProjection) else w
