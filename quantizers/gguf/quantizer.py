"""Levels made by llama.cpp itself: the model written as a float GGUF, quantized uniformly once per ggml type by the
built `llama-quantize` (`--pure`, with an importance matrix from the calibration text when asked), and each layer's
blocks read back with gguf-py. A level is those blocks, byte for byte what the GGUF file stores.

GGUF may store a layer's rows in another order than transformers does (llama.cpp permutes Q and K rows for rotary
embeddings); each layer's order is found by matching the float file's rows against the loaded weight, and the blocks
are put in the loaded model's order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import StrictBool

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.registry import Params

from ..base import QuantizerBase, register
from ..layouts import GgmlBlocks
from . import tools
from .files import GgmlWeight, float_gguf, imatrix, keep_float, record_metadata, row_order, tensor_names
from .index import read_tensors
from .ggml import GGML_TYPES


@register("gguf")
class LlamaCppQuantize(QuantizerBase):
    """llama.cpp's types by its own llama-quantize; `imatrix: true` first runs llama-imatrix on the calibration text
    (the i-quants below 4 bits need it)."""

    summary = "llama.cpp's ggml types made by the built llama-quantize (--pure), optionally with an imatrix"
    layout = GgmlBlocks()

    class Params(Params):
        imatrix: StrictBool = False

    def reads_calibration(self) -> bool:
        return self.imatrix

    def make(self, model, layers, missing, calibration, folder, write, progress=None) -> int:
        matrix = None
        if self.imatrix and any(missing.values()):
            if calibration is None or not len(calibration.tokens):
                raise BitallocError("data.calibration", "gguf with imatrix: true needs calibration sequences")
            matrix = imatrix(model, calibration.tokens, folder)
        return make_levels(model, layers, missing, folder, write, matrix, progress)


def make_levels(model: LoadedModel, layers: list[QuantizableLayer], missing: dict[str, list[Format]],
                folder: Path, write: Callable[[str, Format, GgmlWeight], None], matrix: Path | None,
                progress: Callable[[int], None] | None = None) -> int:
    """Quantize the float GGUF once per ggml type that some layer lacks, and write those layers' levels."""
    from gguf.quants import dequantize

    types = sorted({f.ggml for fmts in missing.values() for f in fmts})
    if not types:
        return 0
    source = float_gguf(model, folder)
    by_name = {l.name: l for l in layers}
    names = tensor_names(model.model_type, list(missing))
    floats = read_tensors(source)
    orders = {name: row_order(dequantize(floats[names[name]].data, floats[names[name]].tensor_type),
                               model.weight(by_name[name]), name)
              for name, fmts in missing.items() if fmts}
    kept = keep_float(floats, set(names.values()))  # else --pure quantizes them at every type: most of the time
    made = 0
    for ggml in types:
        out = folder / f".{ggml}.{os.getpid()}.gguf"
        args = ["--pure", *kept] + (["--imatrix", str(matrix)] if matrix else [])
        tools.run("llama-quantize", [*args, str(source), str(out), GGML_TYPES[ggml].ftype,
                                        str(os.cpu_count() or 1)], f"to {ggml}")
        try:
            record_metadata(out, folder)  # the same for every type: what the store's file bytes start from
            quantized = read_tensors(out)
            for name, fmts in missing.items():
                for fmt in (f for f in fmts if f.ggml == ggml):
                    tensor = quantized[names[name]]
                    if tensor.tensor_type != GGML_TYPES[ggml].qtype:
                        raise BitallocError("formats", f"llama-quantize stored {name!r} as {tensor.tensor_type.name}, "
                                                       f"not {ggml} (rows of {by_name[name].in_features})")
                    blocks = np.asarray(tensor.data).reshape(by_name[name].row_count, -1)  # experts' rows stacked
                    if orders[name] is not None:
                        blocks = blocks[orders[name]]
                    write(name, fmt, GgmlWeight(torch.from_numpy(np.array(blocks)), fmt,
                                                by_name[name].in_features))
                    made += 1
        finally:
            out.unlink(missing_ok=True)
        if progress:
            progress(1)
    return made
