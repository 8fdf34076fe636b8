"""Levels made by llama.cpp itself: the model written as a float GGUF, quantized uniformly once per ggml type by the
built `llama-quantize` (`--pure`, with an importance matrix from the calibration text when asked), and each layer's
blocks read back with gguf-py. A level is those blocks, byte for byte what the GGUF file stores.

The float GGUF is a copy of a GGUF source with every tensor dequantized to F32, or llama.cpp's own
`convert_hf_to_gguf.py` run on a model folder. GGUF may store a layer's rows in another order than transformers
does (llama.cpp permutes Q and K rows for rotary embeddings); each layer's order is found by matching the float
file's rows against the loaded weight, and the blocks are put in the loaded model's order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import llamacpp
from .errors import BitallocError
from .formats import Format
from .ggml_types import GGML_TYPES
from .model import LoadedModel, QuantizableLayer, source_files


@dataclass
class GgmlWeight:
    """One layer's ggml blocks: uint8 [out, bytes per row] in the loaded model's row order."""

    blocks: torch.Tensor
    fmt: Format
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def to(self, device) -> "GgmlWeight":
        return GgmlWeight(self.blocks.to(device), self.fmt, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] as llama.cpp reads the blocks (gguf-py's reference dequantization, float32, on the CPU)."""
        from gguf.quants import dequantize

        w = dequantize(self.blocks.cpu().numpy(), GGML_TYPES[self.fmt.ggml].qtype)
        return torch.from_numpy(np.ascontiguousarray(w)).to(dtype=dtype, device=self.blocks.device)


def gguf_arch(model_type: str | None):
    import gguf

    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    arch = names.get({"mistral": "llama"}.get(model_type or "", model_type or ""))
    if arch is None:
        raise BitallocError("formats", f"llama.cpp: no GGUF tensor names known for model type {model_type!r}")
    return arch


def tensor_names(model_type: str | None, layers: list[str], field: str = "formats") -> dict[str, str]:
    """Each layer's GGUF tensor name (gguf-py's tensor name map)."""
    import re

    import gguf

    blocks = 1 + max((int(m[1]) for name in layers if (m := re.search(r"\.(\d+)\.", name))), default=0)
    mapping = gguf.get_tensor_name_map(gguf_arch(model_type), blocks)
    out = {}
    for name in layers:
        tensor = mapping.get_name(name + ".weight", try_suffixes=(".weight",))
        if tensor is None:
            raise BitallocError(field, f"llama.cpp: no GGUF tensor name for {name!r} ({model_type})")
        out[name] = tensor if tensor.endswith(".weight") else tensor + ".weight"
    return out


def _float_gguf(model: LoadedModel, folder: Path) -> Path:
    """The model as a float GGUF llama-quantize reads (made once per level store)."""
    path = folder / "model-float.gguf"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    needed = 4 * sum(t.numel() for t in model.module.state_dict().values())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise BitallocError("BITALLOC_CACHE", f"llama.cpp quantizes from a float GGUF of {needed / 2**30:.1f} GiB and "
                                              f"{folder} has {free / 2**30:.1f} GiB free; point BITALLOC_CACHE at a "
                                              f"larger disk")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    model_dir, gguf_file = source_files(model.source)
    if gguf_file is not None:
        float_copy(gguf_file, tmp)
    else:
        build = llamacpp.build_dir()
        llamacpp.tool("llama-quantize")  # the converter is cached with the tools
        env = dict(os.environ, PYTHONPATH=f"{build / 'gguf-py'}{os.pathsep}{build}")
        outtype = "f32" if next(model.module.parameters()).dtype == torch.float32 else "auto"
        done = subprocess.run([sys.executable, str(build / "convert_hf_to_gguf.py"), str(model_dir), "--outtype",
                               outtype, "--outfile", str(tmp)], capture_output=True, text=True, env=env)
        if done.returncode:
            lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()] or ["no output"]
            raise BitallocError("formats", f"llama.cpp's convert_hf_to_gguf.py cannot convert {model.source!r}: "
                                           f"{lines[-1].strip()}")
    os.replace(tmp, path)
    return path


def float_copy(source: Path, target: Path,
               transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> None:
    """A GGUF file with the same metadata and every tensor as F32 (gguf-py dequantizes every ggml type), each passed
    through `transform(name, data)` when given."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = gguf.LlamaFileType.ALL_F32
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if transform is not None:
            data = transform(tensor.name, data)
        writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _row_order(float_rows: np.ndarray, weight: torch.Tensor, name: str) -> np.ndarray | None:
    """Index such that float_rows[index] equals the loaded weight's rows (None: the same order)."""
    w = weight.detach().float().cpu().numpy()
    if float_rows.shape == w.shape and np.array_equal(float_rows.astype(np.float32), w):
        return None
    rows = w.shape[0]
    for heads in _head_counts(rows):
        # transformers' reverse of llama.cpp's rotary permutation, on row indices
        index = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)
        if np.array_equal(float_rows[index].astype(np.float32), w):
            return index
    raise BitallocError("formats", f"llama.cpp: the GGUF tensor of {name!r} does not hold the loaded weight's rows")


def _head_counts(rows: int) -> list[int]:
    return [h for h in range(1, rows // 2 + 1) if rows % (2 * h) == 0]


def imatrix_file(folder: Path) -> Path:
    """Where a gguf level store keeps its importance matrix."""
    return folder / "imatrix.gguf"


def imatrix(model: LoadedModel, tokens: torch.Tensor, folder: Path) -> Path:
    """llama-imatrix's importance matrix over the calibration sequences (their text, re-tokenized by llama.cpp)."""
    path = imatrix_file(folder)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "calibration.txt"
    text.write_text("\n".join(model.tokenizer.decode(seq, skip_special_tokens=True) for seq in tokens))
    tmp = folder / f".imatrix.{os.getpid()}.gguf"
    llamacpp.run("llama-imatrix", ["-m", str(_float_gguf(model, folder)), "-f", str(text), "-o", str(tmp),
                                   "-c", str(tokens.shape[1]), "-t", str(os.cpu_count() or 1), "--no-ppl"],
                 "on the calibration text")
    os.replace(tmp, path)
    return path


def make_levels(model: LoadedModel, layers: list[QuantizableLayer], missing: dict[str, list[Format]],
                folder: Path, write: Callable[[str, Format, GgmlWeight], None], imatrix_file: Path | None,
                progress: Callable[[int], None] | None = None) -> int:
    """Quantize the float GGUF once per ggml type that some layer lacks, and write those layers' levels."""
    import gguf
    from gguf.quants import dequantize

    types = sorted({f.ggml for fmts in missing.values() for f in fmts})
    if not types:
        return 0
    source = _float_gguf(model, folder)
    by_name = {l.name: l for l in layers}
    names = tensor_names(model.model_type, list(missing))
    floats = {t.name: t for t in gguf.GGUFReader(source).tensors}
    orders = {name: _row_order(dequantize(floats[names[name]].data, floats[names[name]].tensor_type),
                               model.weight(by_name[name]), name)
              for name, fmts in missing.items() if fmts}
    made = 0
    for ggml in types:
        out = folder / f".{ggml}.{os.getpid()}.gguf"
        args = ["--pure"] + (["--imatrix", str(imatrix_file)] if imatrix_file else [])
        llamacpp.run("llama-quantize", [*args, str(source), str(out), GGML_TYPES[ggml].ftype,
                                        str(os.cpu_count() or 1)], f"to {ggml}")
        try:
            quantized = {t.name: t for t in gguf.GGUFReader(out).tensors}
            for name, fmts in missing.items():
                for fmt in (f for f in fmts if f.ggml == ggml):
                    tensor = quantized[names[name]]
                    if tensor.tensor_type != GGML_TYPES[ggml].qtype:
                        raise BitallocError("formats", f"llama-quantize stored {name!r} as {tensor.tensor_type.name}, "
                                                       f"not {ggml} (rows of {by_name[name].in_features})")
                    blocks = np.asarray(tensor.data).reshape(by_name[name].out_features, -1)
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
