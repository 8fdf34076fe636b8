"""Quantizers: how a weight becomes a level (its stored form at one format), registered by name.

A format names its quantizer (`Format.method`); the job gives each method's parameters (`formats.params`). A
quantizer turns an [out, in] weight into the stored form its runtime keeps — packed codes, scales and zero points
(`PackedWeight`), or llama.cpp's blocks (`GgmlWeight`) — whose bytes are what the cost model counts, so the level
store keeps, and every consumer reads, one form whatever made it. `version` and the parameters key the level store
(with the calibration data, for quantizers that read it): raise `version` when a change alters the levels made.

    rtn   min-max round-to-nearest per group: bitalloc's packed kernels' reference
    rtn-int  round-to-nearest on GPTQ's integer grid (0 in range, integer zero points), which compressed-tensors
          uses too: what llm-compressor's QuantizationModifier makes
    clip  round-to-nearest over the per-group range (shrunk from min-max) of least squared error, each input column
          weighted by its mean squared input on the calibration tokens (AWQ's and llama.cpp's clip searches)
    gptq  GPTQ from each layer's input Hessian on the calibration tokens, FP inputs, each layer on its own
    gptq-ct  the same GPTQ, its bytes counted as compressed-tensors stores them (llm-compressor)
    hqq   HQQ's half-quadratic optimisation of zero points (the `hqq` package), no calibration data
    gguf  llama.cpp's ggml types, made by the built llama-quantize (optionally with llama-imatrix's matrix)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch

from bitalloc.kernels.packed import PackedWeight, pack, pack_weight
from bitalloc.kernels.rtn import QuantizedWeight, _DTYPES, group_errors, quantize

from .errors import BitallocError
from .formats import Format
from .layer_inputs import Kind, collect
from .model import LoadedModel, QuantizableLayer
from .registry import Registry, declared_parameters

Level = PackedWeight  # or gguf_levels.GgmlWeight: both have fmt, in_features, nbytes, to(device)
Write = Callable[[str, Format, object], None]


@dataclass(frozen=True)
class Calibration:
    """The calibration sequences quantizers may read, and their hash (part of such levels' key)."""

    tokens: torch.Tensor
    data_hash: str


class Quantizer(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]
    inputs: ClassVar[Kind | None]

    def params(self) -> dict: ...

    def key(self) -> dict: ...

    def reads_calibration(self) -> bool: ...

    def make(self, model: LoadedModel, layers: list[QuantizableLayer], missing: dict[str, list[Format]],
             calibration: Calibration | None, folder: Path, write: Write,
             progress: Callable[[int], None] | None = None) -> int: ...


class QuantizerBase:
    version: ClassVar[int] = 1
    inputs: ClassVar[Kind | None] = None  # what it reads of the calibration data: None, diagonal or hessian
    summary: ClassVar[str] = ""

    def params(self) -> dict:
        return {name: getattr(self, name) for name in declared_parameters(type(self))[0]}

    def reads_calibration(self) -> bool:
        return self.inputs is not None

    def key(self) -> dict:
        """What identifies the levels this quantizer makes (the level store's key, with the calibration data's hash
        when it reads it)."""
        return {"quantizer": self.name, "version": self.version, "params": self.params()}

    def quantize(self, weight: torch.Tensor, fmt: Format, inputs: torch.Tensor | None = None) -> Level:
        raise NotImplementedError

    def make(self, model, layers, missing, calibration, folder, write, progress=None) -> int:
        """Every missing level, layer by layer (input statistics collected first, in one pass, when needed)."""
        stats = {}
        wanted = [l for l in layers if missing.get(l.name)]
        if self.inputs and wanted:
            if calibration is None or not len(calibration.tokens):
                raise BitallocError("data.calibration", f"{self.name} quantizes against calibration inputs; give "
                                                        f"at least one calibration sequence")
            stats = collect(model, wanted, calibration.tokens, self.inputs)
        made = 0
        for layer in layers:
            w = model.weight(layer) if missing.get(layer.name) else None
            for fmt in missing.get(layer.name, []):
                write(layer.name, fmt, self.quantize(w, fmt, stats.get(layer.name)))
                made += 1
            stats.pop(layer.name, None)
            if progress:
                progress(1)
        return made


_REGISTRY: Registry[Quantizer] = Registry("a quantizer", "formats.method", "formats.params")
QUANTIZERS = _REGISTRY.classes
register = _REGISTRY.register
get_quantizer = _REGISTRY.create


@register("rtn")
class RoundToNearest(QuantizerBase):
    summary = "min-max round-to-nearest per group: bitalloc's packed kernels' reference"

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        return pack_weight(weight, fmt)


@register("rtn-int")
class IntegerGrid(QuantizerBase):
    summary = "round-to-nearest on the integer grid of GPTQ and compressed-tensors (llm-compressor's RTN)"

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        from .gptq import round_to_grid

        return pack(round_to_grid(weight, fmt))


@register("clip")
class ClipSearch(QuantizerBase):
    """Per group, the range min-max x a for a in 1, 1 - 1/grid, ... down to 1 - max_shrink, of least squared error
    (weighted by the input second moments when `weighted`); a = 1 is min-max itself, so the error never grows."""

    summary = "round-to-nearest over the clipped range of least (input-weighted) squared error, per group"

    def __init__(self, grid: int = 20, max_shrink: float = 0.5, weighted: bool = True):
        if not 1 <= grid <= 1000:
            raise BitallocError("formats.params.grid", f"{grid} is not allowed; use 1 to 1000 steps")
        if not 0 < max_shrink < 1:
            raise BitallocError("formats.params.max_shrink", f"{max_shrink} is not allowed; use a fraction in (0, 1)")
        self.grid, self.max_shrink, self.weighted = grid, max_shrink, weighted

    @property
    def inputs(self) -> Kind | None:
        return "diagonal" if self.weighted else None

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        best_err = group_errors(weight, fmt, 1.0, inputs)
        best = torch.ones_like(best_err)
        for step in range(1, int(self.grid * self.max_shrink) + 1):
            factor = 1 - step / self.grid
            err = group_errors(weight, fmt, factor, inputs)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, factor), best)
        return pack(quantize(weight, fmt, shrink=best))


@register("gptq")
class GPTQ(QuantizerBase):
    summary = "GPTQ against each layer's input Hessian (FP inputs, layer by layer), GPTQModel's grid"
    inputs = "hessian"

    def __init__(self, damp: float = 0.01, act_order: bool = False, block: int = 128):
        if not 0 < damp < 1:
            raise BitallocError("formats.params.damp", f"{damp} is not allowed; use a fraction of the mean Hessian "
                                                       f"diagonal in (0, 1), e.g. 0.01")
        if not 1 <= block <= 4096:
            raise BitallocError("formats.params.block", f"{block} is not allowed; use 1 to 4096 columns")
        self.damp, self.act_order, self.block = damp, act_order, block

    def grid(self, weight, fmt):
        """Group scales and zero points fixed before GPTQ runs; None: GPTQModel's way (see `gptq`)."""
        return None

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        from .gptq import gptq

        q, _ = gptq(weight, inputs, fmt, self.damp, self.act_order, self.block, grid=self.grid(weight, fmt))
        return pack(q)


@register("gptq-ct")
class GPTQCompressedTensors(GPTQ):
    """GPTQ as llm-compressor's GPTQModifier runs it: every group's scale and zero point fixed beforehand from the
    original weights (its observer), `act_order` its `actorder: weight`; stored as compressed-tensors'
    pack-quantized checkpoint keeps it: packed codes and scales (symmetric: no zero points, no g_idx), which is
    bitalloc's packed layout (`weight_bytes`)."""

    version = 2  # 1 took each group's grid from the GPTQ-updated weights, as GPTQModel does
    summary = "GPTQ as llm-compressor's GPTQModifier runs it (grid from the original weights), compressed-tensors' bytes"

    def grid(self, weight, fmt):
        from .gptq import static_grid

        return static_grid(weight, fmt)


@register("hqq")
class HalfQuadratic(QuantizerBase):
    """HQQ (Badri & Shaji, 2023) by its own package: zero points (and codes) by half-quadratic splitting under an
    l_p<1 error norm, from min-max, started as HQQ's runtime config starts them (`BaseQuantizeConfig`: rounded at
    4 bits), on the weights as HQQ holds them, in its compute dtype (the format's scale dtype). Stored in bitalloc's layout w = q * scale + m with m = -zero * scale in the
    scale dtype, which HQQ stores as (q - zero) * scale: the two differ by the rounding of m (a float16 ulp)."""

    summary = "HQQ's half-quadratic zero-point optimisation (the hqq package, its defaults), calibration-free"
    version = 2  # 1 started 4-bit zero points unrounded and read float32 weights, unlike HQQ's runtime

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        from hqq.core.quantize import Quantizer as HQQ, hqq_base_quant_config

        if fmt.symmetric:
            raise BitallocError("formats.symmetric", "hqq quantizes asymmetrically; use symmetric: false")
        runtime = hqq_base_quant_config(nbits=fmt.bits, group_size=fmt.group_size)["weight_quant_params"]
        sdt = _DTYPES[fmt.scale_dtype]
        held = weight.detach().to(sdt).float()  # the weights as HQQ holds them: in its compute dtype
        codes, meta = HQQ.quantize(held, nbits=fmt.bits, channel_wise=True,
                                   group_size=fmt.group_size, optimize=True, round_zero=runtime["round_zero"], axis=1,
                                   bitpack=False, compute_dtype=torch.float32, device="cpu")
        rows, cols = weight.shape
        scale = meta["scale"].reshape(rows, -1).to(sdt)
        zero = meta["zero"].reshape(rows, -1).to(sdt)
        m = (-zero.float() * scale.float()).to(sdt)
        return pack(QuantizedWeight(codes.reshape(rows, cols).to(torch.uint8), scale, m, fmt))


@register("gguf")
class LlamaCppQuantize(QuantizerBase):
    """llama.cpp's types by its own llama-quantize (`bitalloc.gguf_levels`); `imatrix: true` first runs llama-imatrix
    on the calibration text (the i-quants below 4 bits need it)."""

    summary = "llama.cpp's ggml types made by the built llama-quantize (--pure), optionally with an imatrix"

    def __init__(self, imatrix: bool = False):
        self.imatrix = imatrix

    def reads_calibration(self) -> bool:
        return self.imatrix

    def make(self, model, layers, missing, calibration, folder, write, progress=None) -> int:
        from . import gguf_levels

        matrix = None
        if self.imatrix and any(missing.values()):
            if calibration is None or not len(calibration.tokens):
                raise BitallocError("data.calibration", "gguf with imatrix: true needs calibration sequences")
            matrix = gguf_levels.imatrix(model, calibration.tokens, folder)
        return gguf_levels.make_levels(model, layers, missing, folder, write, matrix, progress)
