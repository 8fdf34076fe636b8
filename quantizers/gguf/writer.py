"""Writing GGUF files the way llama-quantize lays them out: its metadata (what precedes the tensor index, copied from
a file it wrote), the tensor index in its order (`quantize_order`), each tensor's data padded to the file's
alignment.

gguf-py's writer would do, but it re-encodes the metadata from a reader's view of every entry (seconds for a
tokenizer's 100 k strings) and keeps the order it is given; the layout is small enough to write here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .index import find_value

_U32, _F64, _STRING, _U64 = 4, 12, 8, 10


@dataclass(frozen=True)
class TensorData:
    """One tensor as a GGUF file stores it: its name, dims in ggml's order, ggml type and raw bytes."""

    name: str
    dims: tuple[int, ...]
    tensor_type: int
    data: np.ndarray  # uint8, the bytes as stored

    def entry(self, offset: int) -> bytes:
        name = self.name.encode()
        return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(self.dims))
                + struct.pack(f"<{len(self.dims)}Q", *self.dims) + struct.pack("<IQ", self.tensor_type, offset))


def quantize_order(name: str) -> tuple[int, bytes]:
    """Where llama-quantize writes a tensor: by block number (tensors outside blocks first), then by name — its model
    loader's weight map order, whatever the source file's order."""
    found = re.match(r"blk\.(\d+)\.", name)
    return (int(found[1]) if found else -1, name.encode())


def padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def entry_size(name: str, n_dims: int) -> int:
    """Bytes of a tensor's index entry: its name, dims, type and offset (the same whatever the type)."""
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8


def header_size(meta: bytes, tensors: list[tuple[str, int]], alignment: int) -> int:
    """Bytes before the tensor data of a file with this metadata and these (name, dims count) tensors."""
    return padded(len(meta) + sum(entry_size(n, d) for n, d in tensors), alignment)


def _value(value) -> tuple[int, bytes]:
    if isinstance(value, str):
        raw = value.encode()
        return _STRING, struct.pack("<Q", len(raw)) + raw
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metadata values here are str, int or float, not {type(value).__name__}")
    if isinstance(value, int):
        return _U64, struct.pack("<Q", value)
    return _F64, struct.pack("<d", value)


def with_entries(meta: bytes, entries: dict[str, str | int | float]) -> bytes:
    """The metadata with these entries appended (strings, uint64 and float64; keys it already has are refused)."""
    out = bytearray(meta)
    for key, value in entries.items():
        if find_value(meta, key) is not None:
            raise ValueError(f"the metadata already has {key}")
        vtype, raw = _value(value)
        name = key.encode()
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype) + raw
    (n_kv,) = struct.unpack_from("<Q", out, 16)
    struct.pack_into("<Q", out, 16, n_kv + len(entries))
    return bytes(out)


def with_u32(meta: bytes, key: str, value: int) -> bytes:
    """The metadata with the uint32 entry `key` set to `value`."""
    found = find_value(meta, key)
    if found is None or found[0] != _U32:
        raise ValueError(f"the metadata has no uint32 {key}")
    out = bytearray(meta)
    struct.pack_into("<I", out, found[1], value)
    return bytes(out)


def write(fh: BinaryIO, meta: bytes, tensors: list[TensorData], alignment: int) -> int:
    """Write a GGUF file: `meta` (whose tensor count must be len(tensors)), the index, the data; returns its size."""
    (n_tensors,) = struct.unpack_from("<Q", meta, 8)
    if n_tensors != len(tensors):
        raise ValueError(f"the metadata counts {n_tensors} tensors, {len(tensors)} are written")
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at = padded(at + t.data.nbytes, alignment)
    head = meta + b"".join(t.entry(o) for t, o in zip(tensors, offsets))
    fh.write(head + bytes(padded(len(head), alignment) - len(head)))
    for t in tensors:
        fh.write(memoryview(np.ascontiguousarray(t.data)).cast("B"))
        fh.write(bytes(padded(t.data.nbytes, alignment) - t.data.nbytes))
    return padded(len(head), alignment) + at


def write_file(path: Path, meta: bytes, tensors: list[TensorData], alignment: int) -> int:
    with open(path, "wb") as fh:
        return write(fh, meta, tensors, alignment)
