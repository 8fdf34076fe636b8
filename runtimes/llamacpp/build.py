"""llama.cpp's artifact: the point's GGUF written from the level store, never quantized again.

Every searched tensor is its level's blocks (made by llama-quantize itself, so byte for byte what
`llama-quantize --tensor-type-file` of the exported types writes, importance matrix included), in the float file's
row order; every other tensor is the float file's, in the order llama-quantize writes them; the metadata is the one llama-quantize wrote from the store's
float file (with `general.file_type` as the export's command line sets it, Q8_0), and the model card's `bitalloc.*`
keys after it. Without the card the file is the one the front counted, byte for byte.
"""

from __future__ import annotations

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.quantizers.gguf.files import float_gguf, imatrix_file, quantized_metadata, row_order, tensor_names
from bitalloc.quantizers.gguf.ggml import GGML_TYPES
from bitalloc.quantizers.gguf.index import read_tensors
from bitalloc.quantizers.gguf.writer import (TensorData, header_size, quantize_order, with_entries, with_u32,
                                             write_file)

RECIPE_FILE_TYPE = 7  # LLAMA_FTYPE_MOSTLY_Q8_0: the base type the export's llama-quantize line names


def check_storable(doc) -> None:
    """Every layer of the point at a llama.cpp type: others have no level llama.cpp stores as measured."""
    for name, fmt in doc.formats().items():
        if not fmt.ggml:
            from . import ggml_type

            nearest = ggml_type(fmt, doc.shapes[name][-1] if doc.shapes.get(name) else 0).value
            raise BitallocError("--runtime", f"{name} is at {fmt.name}, which a GGUF does not store as bitalloc "
                                             f"measured it (llama.cpp's nearest: {nearest}); build a point of a job "
                                             f"searched with formats.target: llamacpp, or export the config with "
                                             f"--format llamacpp --nearest for llama-quantize to make")


def tensors(ws, doc) -> tuple[list[TensorData], int]:
    """The file's tensors in llama-quantize's order, and how many are levels."""
    from gguf.quants import dequantize

    store = ws.levels.stores["gguf"]
    floats = read_tensors(float_gguf(ws.model, store.folder))
    formats = doc.formats()
    names = tensor_names(doc.model.type, list(formats), "--runtime")
    by_tensor = {t: n for n, t in names.items()}
    layers = {l.name: l for l in ws.layers}
    out, levels = [], 0
    for t in sorted(floats.values(), key=lambda t: quantize_order(t.name)):
        raw = np.asarray(t.data).view(np.uint8)
        name = by_tensor.get(t.name)
        if name is not None:
            fmt = formats[name]
            blocks = ws.levels.read(name, fmt).blocks.cpu().numpy()  # the loaded model's row order
            rows = dequantize(np.asarray(t.data), t.tensor_type).reshape(blocks.shape[0], -1)
            order = row_order(rows, ws.model.weight(layers[name]).reshape(blocks.shape[0], -1), name)
            if order is not None:
                blocks = blocks[np.argsort(order)]
            raw, ttype, levels = blocks, GGML_TYPES[fmt.ggml].qtype, levels + 1
        else:
            ttype = t.tensor_type
        out.append(TensorData(t.name, tuple(int(d) for d in t.shape), int(ttype), raw.reshape(-1)))
    return out, levels


def build(ws, picked, card: dict, path) -> dict:
    """Write the point's GGUF to `path`; returns its figures (bytes, the card's bytes, levels written)."""
    doc = picked.config
    check_storable(doc)
    store = ws.levels.stores["gguf"]
    matrix = imatrix_file(store.folder) if store.quantizer.imatrix else None
    meta, alignment = quantized_metadata(ws.model, store.folder, matrix)
    plain = with_u32(meta, "general.file_type", RECIPE_FILE_TYPE)
    data, levels = tensors(ws, doc)
    carded = with_entries(plain, card)
    size = write_file(path, carded, data, alignment)
    index = [(t.name, len(t.dims)) for t in data]
    card_bytes = header_size(carded, index, alignment) - header_size(plain, index, alignment)
    return {"bytes": size, "card_bytes": card_bytes, "levels": levels, "tensors": len(data)}
