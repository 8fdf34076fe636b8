"""A GGUF file's tensors without its metadata: gguf-py's reader builds a numpy view of every metadata entry, and a
tokenizer's 100 k strings make that seconds per file — most of the time of making a small model's levels, which
reads one file per ggml type. Here the metadata is skipped in one pass and only the tensor index is read; the
tensors are views of the memory-mapped file, shaped as gguf-py shapes them (quantized types as uint8 rows)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_ALIGNMENT_KEY = b"general.alignment"


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order (row length first)
    n_bytes: int
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        self.at += n
        return bytes(self.buf[self.at - n:self.at])

    def skip(self, vtype: int) -> None:
        if vtype in _FIXED:
            self.at += _FIXED[vtype]
        elif vtype == _STRING:
            n = self.take("<Q")
            self.at += n
        elif vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _FIXED:
                self.at += _FIXED[etype] * count
            else:
                for _ in range(count):
                    self.skip(etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.at}")


def _index(path: Path):
    """(the mapped file, each tensor's (name, dims, type, offset), where the tensor data starts, the alignment, where
    the metadata ends)."""
    from gguf import GGMLQuantizationType as T

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mapped))
    if bytes(cur.buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cur.at = 4
    if cur.take("<I") not in (2, 3):
        raise ValueError(f"{path}: a GGUF version this reader does not know")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.take("<I")
        if key == _ALIGNMENT_KEY and vtype == _UINT32:
            alignment = cur.take("<I")
        else:
            cur.skip(vtype)
    infos, kv_end = [], cur.at
    for _ in range(n_tensors):
        name = cur.string().decode()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        infos.append((name, dims, T(cur.take("<I")), cur.take("<Q")))
    return mapped, infos, -(-cur.at // alignment) * alignment, alignment, kv_end


def data_start(path: Path) -> tuple[int, int]:
    """(bytes before the tensor data: header, metadata, tensor index and padding; the file's alignment)."""
    _, _, start, alignment, _ = _index(path)
    return start, alignment


def metadata(path: Path) -> tuple[bytes, int]:
    """(the file's bytes up to its tensor index: magic, version, counts and every metadata entry; its alignment)."""
    mapped, _, _, alignment, kv_end = _index(path)
    return bytes(mapped[:kv_end]), alignment


def alignment_of(meta: bytes) -> int:
    """The alignment `metadata`'s bytes set (general.alignment, else GGUF's default 32)."""
    found = find_value(meta, _ALIGNMENT_KEY.decode())
    return struct.unpack_from("<I", meta, found[1])[0] if found and found[0] == _UINT32 else 32


def find_value(meta: bytes, key: str) -> tuple[int, int] | None:
    """(value type, offset of the value) of a metadata entry in `metadata`'s bytes, None if absent."""
    cur = _Cursor(memoryview(meta))
    cur.at = 16
    for _ in range(cur.take("<Q")):
        name, vtype = cur.string(), cur.take("<I")
        if name == key.encode():
            return vtype, cur.at
        cur.skip(vtype)
    return None


def read_tensors(path: Path) -> dict[str, GgufTensor]:
    """Every tensor of a (little-endian, version 2 or 3) GGUF file by name."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    plain = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
             T.I32: np.int32, T.I64: np.int64}
    mapped, infos, start, _, _ = _index(path)
    out = {}
    for name, dims, ttype, offset in infos:
        block, size = GGML_QUANT_SIZES[ttype]
        n_elems = int(np.prod(dims))
        n_bytes = n_elems * size // block
        raw = mapped[start + offset:start + offset + n_bytes]
        shape = tuple(reversed(dims))
        if ttype in plain:
            data = raw.view(plain[ttype]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] * size // block)
        out[name] = GgufTensor(name, ttype, dims, n_bytes, data)
    return out
