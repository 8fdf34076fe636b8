"""What every runtime's `verify` shares: bitalloc's own log-probabilities of a point, the runtime's measurement of it
as a `RuntimePoint` (bytes as the runtime stores them, its files' size and digest), and, for runtimes whose weights
bitalloc reads back dequantized, their measurement and comparison with the job's levels (`weights_point`)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from bitalloc.evaluate import Evaluator, model_output
from bitalloc.formats import shape_bytes
from bitalloc.results import ConfigDoc, RuntimePoint
from bitalloc.units import mib


SAME_WEIGHT = 2**-10  # a difference below this share of the layer's largest weight is float16 rounding
MATCHING = 0.99  # a layer whose weights are this share the same is bitalloc's level: the rest round the other way
#                  on float differences (e.g. a Hessian summed in another order)


class LogProbs:
    """bitalloc's own log-probabilities on a set of windows: the float32 model's (kept) and a config's."""

    def __init__(self, ws, tokens: torch.Tensor):
        self.ws = ws
        self.evaluator = Evaluator(ws.model, ws.levels, tokens, ws.batch_size)
        self.reference = [lp for batch in self.evaluator.reference for lp in batch]

    @torch.no_grad()
    def config(self, doc: ConfigDoc) -> list[torch.Tensor]:
        with self.evaluator.streamed(doc.formats()):
            return [lp for batch in self.evaluator.batches for lp in model_output(self.ws.model, batch)]


def files_sha256(files: list[Path]) -> str:
    """sha256 over the files' bytes in order (a runtime's checkpoint may be several files), read in chunks."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def runtime_point(runtime: str, label: str, other_bytes: int, stored_layer_bytes: int, files: list[Path],
                  loss: float, quality: float, tokens: int, picked=None, **fields) -> RuntimePoint:
    """The runtime's measurement: whole-model bytes are the runtime's stored layer bytes plus the front's other
    bytes; a point of the front (`picked`) carries its config and bitalloc's counted bytes, a preset neither."""
    total = other_bytes + stored_layer_bytes
    if picked is not None:
        fields.update(config=picked.point.config, counted_layer_bytes=picked.config.totals.bytes - other_bytes)
    return RuntimePoint(runtime=runtime, label=label, bytes=total, mib=round(mib(total), 6),
                        stored_layer_bytes=stored_layer_bytes, file_bytes=sum(f.stat().st_size for f in files),
                        file_sha256=files_sha256(files), loss=loss, quality=quality, tokens=tokens, **fields)


def rel_diff(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    """The largest difference over the largest weight of ours."""
    return float((theirs - ours).abs().max() / ours.abs().max().clamp(min=1e-30))


def same_share(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    """The share of weights equal to ours up to float16 rounding."""
    return float(((theirs - ours).abs() <= SAME_WEIGHT * ours.abs().max()).float().mean())


def weights_point(runtime: str, ws, picked, weights: dict[str, torch.Tensor], stored: dict[str, int],
                  files: list[Path]) -> RuntimePoint:
    """The point as a runtime's weights (`weights`: layer -> [out, in] as the runtime dequantizes it; `stored`: the
    bytes it stores per layer): measured by bitalloc's evaluator on the job's held-out tokens, and compared with the
    job's levels (`weight_max_rel_diff`: the largest difference over the layer's largest weight; `layers_matching`:
    the layers whose weights are the levels, at least 99 % of them up to float16 rounding)."""
    doc = picked.config
    dtype = next(ws.model.module.parameters()).dtype
    pairs = [(weights[n].float(), ws.levels.weight(n, f).float()) for n, f in doc.formats().items() if f.quantized]
    measured = ws.local_runner().evaluator("evaluation").evaluate_tensors(
        {n: w.to(dtype) for n, w in weights.items() if n in doc.layers})
    stored_bytes = sum(stored[n] for n in weights if n in doc.layers)
    # a layer the runtime left in 16 bits as the front counts it; a token embedding it keeps, at the model's dtype
    kept = sum(math.prod(doc.shapes[n]) * dtype.itemsize if n in doc.embeddings else shape_bytes(doc.shapes[n], f)
               for n, f in doc.formats().items() if n not in weights)
    return runtime_point(runtime, picked.point.label, picked.front.model.other_bytes, stored_bytes + kept, files,
                         measured.loss, measured.quality, measured.tokens, picked, bitalloc_loss=picked.point.loss,
                         details={"weight_max_rel_diff": max((rel_diff(*p) for p in pairs), default=0.0),
                                  "layers_matching": float(sum(same_share(*p) >= MATCHING for p in pairs))})
