"""verify for bitalloc's runtime: the point written as `bitalloc pack` writes it, loaded back by `load_packed`, each
QuantLinear's packed weight dequantized and measured by bitalloc's evaluator on the job's held-out tokens, and
compared with the job's levels (`layers_matching`: the layers whose packed weight is the job's level)."""

from __future__ import annotations

from pathlib import Path


from bitalloc.formats import weight_bytes
from bitalloc.kernels.packed import dequantize_packed
from bitalloc.kernels.quant_linear import QuantLinear

from ..points import runtime_point
from ..python import MATCHING, rel_diff, same_share
from .checkpoint import WEIGHTS_FILE, load_packed, pack


def verify(ws, picked, work: Path, stages) -> list:
    doc = picked.config
    with stages.stage("bitalloc: pack and load the checkpoint"):
        folder = work / "packed"
        pack(doc, folder, picked.front.data.hash)
        loaded = load_packed(folder)
    dtype = next(ws.model.module.parameters()).dtype
    packed = {name: m.packed for name, m in loaded.module.named_modules() if isinstance(m, QuantLinear)}
    weights = {name: dequantize_packed(p, dtype) for name, p in packed.items()}
    pairs = [(weights[n].float(), ws.levels.weight(n, f).float()) for n, f in doc.formats().items() if f.quantized]
    with stages.stage("bitalloc: measure"):
        measured = ws.local_runner().evaluator("evaluation").evaluate_tensors(
            {n: w for n, w in weights.items() if n in doc.layers})
    stored = sum(p.nbytes for p in packed.values()) + sum(weight_bytes(*doc.shapes[n], f)
                                                          for n, f in doc.formats().items() if n not in packed)
    return [runtime_point("bitalloc", picked.point.label, picked.front.model.other_bytes, stored,
                          [folder / WEIGHTS_FILE], measured.loss, measured.quality, measured.tokens, picked,
                          bitalloc_loss=picked.point.loss,
                          details={"weight_max_rel_diff": max((rel_diff(*p) for p in pairs), default=0.0),
                                   "layers_matching": float(sum(same_share(*p) >= MATCHING for p in pairs))})]
