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
    packed = {name: m.packed for name, m in modules.items() if isinstance(m, QuantEmbedding)
              or isinstance(m, PackedProjection)
              or (isinstance(m, QuantLinear) and m.qweight.data_ptr() not in tables)}  # a tied head: its table's
    experts = {name: m.experts for name, m in modules.items() if isinstance(m, PackedProjection)}
    weights = {name: dequantize_packed(p, dtype) for name, p in packed.items()}
    weights = {name: w.reshape(experts[name], -1, w.shape[-1]) if name in experts else w for name, w in weights.items()}
    with stages.stage("bitalloc: measure"):
        point = weights_point("bitalloc", ws, picked, weights, {n: p.nbytes for n, p in packed.items()},
                              sorted(p for p in folder.rglob("*") if p.is_file()))
    if picked.front.model.bytes_of == "bitalloc":  # the front counts this folder's bytes: how close it came
        point.details["front_minus_folder_bytes"] = float(picked.point.bytes - point.file_bytes)
    return [point]
