"""GGUF files: a layer's ggml blocks (`GgmlWeight`), GGUF tensor names, the model as a float GGUF llama.cpp's tools
read (a copy of a GGUF source with every tensor dequantized to F32, or llama.cpp's own `convert_hf_to_gguf.py` run
on a model folder), and llama-imatrix's importance matrix."""

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

from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.model import LoadedModel, source_files

from . import tools
from .ggml import GGML_TYPES


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
    # llama.cpp's converter writes Mistral and Mixtral as llama; its MoE names drop transformers' underscores
    model_type = {"mistral": "llama", "mixtral": "llama", "gpt_oss": "gpt-oss"}.get(model_type or "", model_type or "")
    arch = names.get(model_type, names.get(model_type.replace("_", "")))
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


def keep_float(floats: dict, searched) -> list[str]:
    """llama-quantize's flags that keep the token embedding and the output head at the float file's type where no
    searched layer is them (its presets, and --pure, would quantize them): what the front counts them at."""
    flags = (("token_embd.weight", "--token-embedding-type"), ("output.weight", "--output-tensor-type"))
    return [arg for t, flag in flags if t in floats and t not in searched
            for arg in (flag, floats[t].tensor_type.name.lower())]


def float_gguf(model: LoadedModel, folder: Path) -> Path:
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
        build = tools.build_dir()
        tools.tool("llama-quantize")  # the converter is cached with the tools
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


METADATA_FILE = "quantized-metadata.gguf"


def record_metadata(written: Path, folder: Path) -> tuple[bytes, int]:
    """Keep what precedes the tensor index in a file llama-quantize wrote from the store's float file (metadata and
    tokenizer: the same whatever types it stores, but for `general.file_type`) and the file's alignment: what the
    store's file bytes and its artifacts start from."""
    from .index import metadata

    meta, alignment = metadata(written)
    tmp = folder / f".{METADATA_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(meta)
    os.replace(tmp, folder / METADATA_FILE)
    return meta, alignment


def quantized_metadata(model: LoadedModel, folder: Path, matrix: Path | None) -> tuple[bytes, int]:
    """(metadata bytes, alignment) of the files llama-quantize writes from the store's float file (with the store's
    importance matrix, whose name the metadata records): kept when the levels were made, else measured on one
    q8_0 file, written and removed."""
    from .index import alignment_of

    kept = folder / METADATA_FILE
    if kept.is_file():
        meta = kept.read_bytes()
        return meta, alignment_of(meta)
    out = folder / f".metadata.{os.getpid()}.gguf"
    args = ["--pure"] + (["--imatrix", str(matrix)] if matrix else [])
    try:
        tools.run("llama-quantize", [*args, str(float_gguf(model, folder)), str(out), "Q8_0",
                                     str(os.cpu_count() or 1)], "to q8_0 (its metadata)")
        return record_metadata(out, folder)
    finally:
        out.unlink(missing_ok=True)


def row_order(float_rows: np.ndarray, weight: torch.Tensor, name: str) -> np.ndarray | None:
    """Index such that float_rows[index] equals the loaded weight's rows (None: the same order): llama.cpp's converter
    permutes Q and K rows for rotary embeddings."""
    w = weight.detach().float().cpu().numpy()
    if float_rows.shape == w.shape and np.array_equal(float_rows.astype(np.float32), w):
        return None
    rows = w.shape[0]
    for heads in [h for h in range(1, rows // 2 + 1) if rows % (2 * h) == 0]:
        # transformers' reverse of llama.cpp's rotary permutation, on row indices
        index = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)
        if np.array_equal(float_rows[index].astype(np.float32), w):
            return index
    raise BitallocError("formats", f"llama.cpp: the GGUF tensor of {name!r} does not hold the loaded weight's rows")


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
    tools.run("llama-imatrix", ["-m", str(float_gguf(model, folder)), "-f", str(text), "-o", str(tmp),
                                   "-c", str(tokens.shape[1]), "-t", str(os.cpu_count() or 1), "--no-ppl"],
                 "on the calibration text")
    os.replace(tmp, path)
    return path
