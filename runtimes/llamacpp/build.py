"""llama.cpp's artifact: the point's GGUF written from the level store, never quantized again.

Every searched tensor is its level's blocks (made by llama-quantize itself, so byte for byte what
`llama-quantize --tensor-type-file` of the exported types writes, importance matrix included), in the float file's
row order; every other tensor is the float file's, in the order llama-quantize writes them; the metadata is the one
llama-quantize wrote from the store's float file (with `general.file_type` as the export's command line sets it,
Q8_0), and the model card's `bitalloc.*` keys after it. Without the card the file is the one the front counted, byte
for byte.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from bitalloc.errors import BitallocError
from bitalloc.quantizers.gguf.files import float_gguf, imatrix_file, quantized_metadata, row_order, tensor_names
from bitalloc.quantizers.gguf.ggml import GGML_TYPES
from bitalloc.quantizers.gguf.index import read_tensors
from bitalloc.quantizers.gguf.writer import (TensorData, header_size, quantize_order, with_entries, with_u32,
                                             write_file)

RECIPE_FILE_TYPE = 7  # LLAMA_FTYPE_MOSTLY_Q8_0: the base type the export's llama-quantize line names


def unstored(fmt) -> str:
    """Why a GGUF cannot hold a level at `fmt` as measured ("": it can): only llama.cpp types' levels are
    llama-quantize's blocks (a 16-bit layer is written as llama.cpp's f16 or bf16 of the float tensor)."""
    return "" if fmt.ggml or not fmt.quantized else "not a level llama-quantize made"


def check_storable(doc) -> None:
    """Every quantized layer of the point at a llama.cpp type (`unstored`)."""
    for name, fmt in doc.formats().items():
        if unstored(fmt):
            from . import ggml_type

            nearest = ggml_type(fmt, doc.shapes[name][-1] if doc.shapes.get(name) else 0).value
            raise BitallocError("--runtime", f"{name} is at {fmt.name}, which a GGUF does not store as bitalloc "
                                             f"measured it (llama.cpp's nearest: {nearest}); build a point of a job "
                                             f"searched with formats.target: llamacpp, or pass --nearest")


class FileLayout:
    """The tensors of a GGUF written from a level store, for any assignment of its layers to llama.cpp types: the
    float file's tensors in llama-quantize's order, each assigned layer's level blocks in the float file's row order
    (worked out once per layer), every other tensor the float file's. The build writes one point with it; the
    llama.cpp evaluator one candidate after another."""

    def __init__(self, model, levels, field: str = "--runtime"):
        self.model, self.levels = model, levels
        self.store = levels.stores["gguf"]
        self.float_file = float_gguf(model, self.store.folder)
        self.floats = sorted(read_tensors(self.float_file).values(), key=lambda t: quantize_order(t.name))
        self.names = tensor_names(model.model_type, list(levels.layers), field)
        self.layer_of = {t: n for n, t in self.names.items()}
        self._orders: dict[str, np.ndarray | None] = {}

    def metadata(self) -> tuple[bytes, int]:
        """(metadata, alignment) as llama-quantize writes them for the export's command line."""
        matrix = imatrix_file(self.store.folder) if self.store.quantizer.imatrix else None
        meta, alignment = quantized_metadata(self.model, self.store.folder, matrix)
        return with_u32(meta, "general.file_type", RECIPE_FILE_TYPE), alignment

    def _order(self, name: str, tensor, rows: int) -> np.ndarray | None:
        if name not in self._orders:
            from gguf.quants import dequantize

            floats = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(rows, -1)
            weight = self.model.weight(self.levels.layers[name]).reshape(rows, -1)
            self._orders[name] = row_order(floats, weight, name)
        return self._orders[name]

    def tensors(self, formats: dict) -> tuple[list[TensorData], int]:
        """The file's tensors with each layer of `formats` (name -> Format) at its level, and how many are levels."""
        out, levels = [], 0
        for t in self.floats:
            raw, ttype = np.asarray(t.data).view(np.uint8), t.tensor_type
            name = self.layer_of.get(t.name)
            if name in formats and not formats[name].quantized:  # kept in 16 bits: llama.cpp's f16 or bf16 of it
                from gguf.quants import dequantize, quantize

                half = formats[name].scale_dtype == "float16"
                qtype = GGMLQuantizationType.F16 if half else GGMLQuantizationType.BF16
                raw = quantize(dequantize(np.asarray(t.data), ttype), qtype).view(np.uint8)
                ttype = qtype
            elif name in formats:
                fmt = formats[name]
                blocks = self.levels.read(name, fmt).blocks.cpu().numpy()  # the loaded model's row order
                order = self._order(name, t, blocks.shape[0])
                if order is not None:
                    blocks = blocks[np.argsort(order)]
                raw, ttype, levels = blocks, GGML_TYPES[fmt.ggml].qtype, levels + 1
            out.append(TensorData(t.name, tuple(int(d) for d in t.shape), int(ttype), raw.reshape(-1)))
        return out, levels


def build(ws, picked, card: dict, path) -> dict:
    """Write the point's GGUF to `path`; returns its figures (bytes, the card's bytes, levels written)."""
    doc = picked.config
    check_storable(doc)
    layout = FileLayout(ws.model, ws.levels)
    plain, alignment = layout.metadata()
    data, levels = layout.tensors(doc.formats())
    carded = with_entries(plain, card)
    size = write_file(path, carded, data, alignment)
    index = [(t.name, len(t.dims)) for t in data]
    card_bytes = header_size(carded, index, alignment) - header_size(plain, index, alignment)
    return {"bytes": size, "card_bytes": card_bytes, "levels": levels, "tensors": len(data)}
