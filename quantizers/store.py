"""The level store: every (layer, format) quantized once, kept on disk in its stored form, read on demand.

A level is what a quantizer makes of one layer at one format: packed codes, scales and zero points, or llama.cpp's
blocks — exactly the bytes the cost model counts (a 16-bit format's level is the weight cast, made on demand, never
stored). Levels are safetensors files under $BITALLOC_CACHE/levels/ (default ~/.cache/bitalloc/levels/), keyed by the
model's content hash, the quantizer (name, version, parameters, and the calibration data's hash when it reads it)
and the format, one file per layer; each format's levels come from the store of its method. A later job on the same
model reuses them, and every process of a job (Ray workers included) reads the same files — one copy in the OS page
cache — instead of receiving tensors.

`Levels` is a job's view of its levels. Evaluation asks it for dequantized weights layer by layer while the model
runs; a bounded working set keeps the most recently used ones (by default one candidate's worth, so the held-out
batches of one candidate dequantize each layer once), so the memory held does not grow with the number of formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from bitalloc.kernels.packed import PackedWeight, dequantize_packed
from bitalloc.kernels.rtn import fake_quantize

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, substitute
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.paths import cache_dir
from bitalloc.profiling import release_freed_memory

from .base import Calibration, Quantizer, get_quantizer
from .gguf.files import GgmlWeight


class LevelStore:
    """The files of one model's levels by one quantizer."""

    def __init__(self, model_hash: str, quantizer: Quantizer, root: Path | None = None,
                 calibration: Calibration | None = None):
        self.model_hash = model_hash
        self.quantizer = quantizer
        self.calibration = calibration if quantizer.reads_calibration() else None
        self.key = quantizer.key() | ({"calibration": self.calibration.data_hash} if self.calibration else {})
        key = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.folder = (root or cache_dir("levels")) / model_hash.removeprefix("sha256:")[:24] / f"{quantizer.name}-{key}"

    def path(self, layer: str, fmt: Format) -> Path:
        return self.folder / fmt.name / f"{layer}.safetensors"

    def has(self, layer: str, fmt: Format) -> bool:
        return self.path(layer, fmt).is_file()

    def write(self, layer: str, fmt: Format, level: PackedWeight | GgmlWeight) -> None:
        """Atomically: a reader never sees half a file, and two jobs making the same level both end with it."""
        path = self.path(layer, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(level, GgmlWeight):
            tensors = {"blocks": level.blocks}
        else:
            tensors = {"qweight": level.qweight, "scales": level.scales}
            if level.zeros is not None:
                tensors["zeros"] = level.zeros
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        meta = {"format": json.dumps(fmt.to_dict()), "in_features": str(level.in_features),
                "quantizer": json.dumps(self.key, default=str), "model": self.model_hash}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def read(self, layer: str, fmt: Format) -> PackedWeight | GgmlWeight:
        """The level, read from its file (through the OS page cache, which every process reading it shares)."""
        path = self.path(layer, fmt)
        try:
            data = path.read_bytes()
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            tensors = load(data)
            in_features = int(header["__metadata__"]["in_features"])
            if fmt.ggml:
                return GgmlWeight(tensors["blocks"], fmt, in_features)
            return PackedWeight(tensors["qweight"], tensors["scales"], tensors.get("zeros"), fmt, in_features)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise BitallocError("BITALLOC_CACHE", f"the level file {path} cannot be read ({type(exc).__name__}); "
                                                  f"delete it and run again to remake it") from None

    def _check_disk(self, needed: int) -> None:
        where = self.folder
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        if needed > free:
            raise BitallocError("BITALLOC_CACHE", f"the level store needs {needed / 2**20:.0f} MiB and {where} has "
                                                  f"{free / 2**20:.0f} MiB free; point BITALLOC_CACHE at a larger "
                                                  f"disk, or choose fewer formats or layers")

    def fill(self, model: LoadedModel, layers: list[QuantizableLayer], formats: Iterable[Format],
             progress: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Make every missing level of this store's method (for the layers each format fits); returns (made,
        reused). Refuses first if the disk cannot take them."""
        formats = [f for f in formats if f.quantized and f.method == self.quantizer.name]
        wanted = {l.name: [f for f in formats if f.fits(l.in_features)] for l in layers}
        missing = {name: [f for f in fmts if not self.has(name, f)] for name, fmts in wanted.items()}
        by_name = {l.name: l for l in layers}
        self._check_disk(sum(by_name[n].bytes_at(f) for n, fmts in missing.items() for f in fmts))
        made = self.quantizer.make(model, layers, missing, self.calibration, self.folder, self.write, progress)
        release_freed_memory()
        return made, sum(map(len, wanted.values())) - made


def open_stores(model_hash: str, formats: Iterable[Format], quantizers: dict[str, Quantizer] | None = None,
                calibration: Calibration | None = None, root: Path | None = None) -> dict[str, LevelStore]:
    """One store per method the formats use (a method without an instance in `quantizers` gets its defaults)."""
    quantizers = quantizers or {}
    methods = dict.fromkeys(f.method for f in formats if f.quantized)
    return {m: LevelStore(model_hash, quantizers.get(m) or get_quantizer(m), root, calibration) for m in methods}


def level_bytes(layers: Iterable[QuantizableLayer], formats: Iterable[Format]) -> int:
    """Bytes of the stored levels of these layers at the formats that fit them (16-bit formats are not stored)."""
    formats = [f for f in formats if f.quantized]
    return sum(l.bytes_at(f) for l in layers for f in formats if f.fits(l.in_features))


def dense_bytes(model: LoadedModel, layers: Iterable[QuantizableLayer]) -> int:
    """Bytes of one dense copy of these layers' weights in their own dtype: what one candidate needs at a time."""
    return sum(l.numel * model.parameter(l).element_size() for l in layers)


class Levels:
    """A job's levels: layers x formats, read from the store on demand.

    `weight` gives a level dequantized in the layer's dtype and storage layout, kept in a working set of at most
    `working_set` bytes (least recently used dropped first; None keeps everything). `packed` gives the stored form;
    with `device`, every quantized level is held packed there (GPU workers run them on the packed kernels)."""

    def __init__(self, model: LoadedModel, layers: list[QuantizableLayer], formats: Iterable[Format],
                 stores: dict[str, LevelStore], working_set: int | None = None,
                 device: str | torch.device | None = None):
        self.model = model
        self.layers = {layer.name: layer for layer in layers}
        self.formats = tuple(formats)
        self.stores = stores
        self.working_set = working_set
        self._by_name = {f.name: f for f in self.formats}
        self._dense: OrderedDict[tuple[str, Format], torch.Tensor] = OrderedDict()
        self._dense_bytes = 0
        self.device = device
        self._packed = ({(name, f): self.read(name, f).to(device) for name, layer in self.layers.items()
                         for f in self.formats if f.quantized and f.fits(layer.in_features)}
                        if device is not None else {})

    def format_named(self, name: str) -> Format:
        return self._by_name[name]

    def read(self, layer: str, fmt: Format) -> PackedWeight | GgmlWeight:
        """The stored level; for a format that does not fit the layer, its stand-in's (`formats.substitute`)."""
        fmt = substitute(fmt, self.layers[layer].in_features, self.formats) or fmt
        return self.stores[fmt.method].read(layer, fmt)

    def packed(self, layer: str, fmt: Format) -> PackedWeight | GgmlWeight:
        held = self._packed.get((layer, fmt))
        return held if held is not None else self.read(layer, fmt)

    def weight(self, layer: str, fmt: Format, keep: bool = True) -> torch.Tensor:
        """The level dequantized, in the layer's dtype and the form `LoadedModel.put` takes (`LoadedModel.stored`);
        kept in the working set unless `keep` is False (a caller that visits every level in turn gains nothing)."""
        key = (layer, fmt)
        if key in self._dense:
            self._dense.move_to_end(key)
            return self._dense[key]
        spec = self.layers[layer]
        dtype = self.model.parameter(spec).dtype
        if fmt.quantized:
            level = self.packed(layer, fmt)
            w = level.dequantize(dtype) if isinstance(level, GgmlWeight) else dequantize_packed(level, dtype)
            w = w.reshape(spec.shape)
        else:  # the weight stored in 16 bits, read back in its own dtype
            w = fake_quantize(self.model.weight(spec), fmt)
        w = self.model.stored(spec, w)
        if keep:
            self._keep(key, w)
        return w

    def _keep(self, key, w: torch.Tensor) -> None:
        size = w.numel() * w.element_size()
        if self.working_set is not None:
            while self._dense and self._dense_bytes + size > self.working_set:
                _, old = self._dense.popitem(last=False)
                self._dense_bytes -= old.numel() * old.element_size()
            if size > self.working_set:
                return
        self._dense[key] = w
        self._dense_bytes += size

    @property
    def held_bytes(self) -> int:
        """Bytes of dequantized weights the working set holds now."""
        return self._dense_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the stored levels (what the level store holds for this job)."""
        return level_bytes(self.layers.values(), self.formats)
