"""What every runtime's `verify` shares: bitalloc's own log-probabilities of a point, and the runtime's measurement
of it as a `RuntimePoint` (bytes as the runtime stores them, its files' size and digest)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from bitalloc.evaluate import Evaluator, model_output
from bitalloc.results import ConfigDoc, RuntimePoint
from bitalloc.units import mib


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
