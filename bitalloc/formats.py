"""Weight formats and their exact storage cost.

A format is grouped quantization along a layer's input dimension: `bits` per weight, one scale per group (and
one zero point per group when asymmetric), both stored in `scale_dtype`, made by the quantizer named `method`
(`bitalloc.quantizers`). `bits == 16` keeps the weight unquantized, stored in a 16-bit float (`scale_dtype` names
which: float16 or bfloat16). A `ggml` format is one of llama.cpp's types (`bitalloc.quantizers.gguf.ggml`), made by
llama.cpp itself (method `gguf`); its bits, group size and symmetry are the type's, for display and constraints.

Bytes, and which row widths a format can store, are those of the byte layout its method's quantizer registers
(`bitalloc.quantizers.layouts`): the runtime that loads the levels stores exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BitallocError

QUANT_BITS = (2, 3, 4, 5, 6, 8)
KEEP_BITS = 16
SCALE_DTYPES = ("float16", "bfloat16", "float32")
MAX_GROUP_SIZE = 1 << 16  # wider than any row: a group of at least a row's width is one group per row


@dataclass(frozen=True, order=True)
class Format:
    bits: int
    group_size: int | None = 64
    symmetric: bool = False
    scale_dtype: str = "float16"
    method: str = "rtn"
    ggml: str = ""

    def __post_init__(self) -> None:
        if self.bits == KEEP_BITS:
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "symmetric", True)
            object.__setattr__(self, "method", "rtn")
        validate_format(self, "format")

    @classmethod
    def of_ggml(cls, name: str) -> "Format":
        """llama.cpp's type `name` (e.g. q4_K) as a format made by llama-quantize."""
        from .quantizers.gguf.ggml import GGML_TYPES

        if name not in GGML_TYPES:
            raise BitallocError("format.ggml", f"{name!r} is not a llama.cpp type bitalloc reads; allowed: "
                                               f"{', '.join(GGML_TYPES)}")
        t = GGML_TYPES[name]
        return cls(t.bits, t.block, t.symmetric, "float16", "gguf", name)

    def fits(self, in_features: int) -> bool:
        """Whether a row of this width can be stored in this format (its method's byte layout: ggml types need whole
        blocks, GPTQ, HQQ and compressed-tensors checkpoints whole groups; bitalloc's layout takes any width)."""
        return not self.quantized or layout(self).fits(self, in_features)

    @property
    def quantized(self) -> bool:
        return self.bits != KEEP_BITS

    @property
    def name(self) -> str:
        if not self.quantized:
            return "fp16" if self.scale_dtype == "float16" else "bf16"
        if self.ggml:
            return self.ggml
        kind = "s" if self.symmetric else "a"
        scale = {"float16": "", "bfloat16": "-bf16", "float32": "-f32"}[self.scale_dtype]
        method = "" if self.method == "rtn" else f"-{self.method}"
        return f"w{self.bits}g{self.group_size}{kind}{scale}{method}"

    def to_dict(self) -> dict:
        out = {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric if self.quantized else None,
            "scale_dtype": self.scale_dtype,
            "method": self.method,
        }
        if self.ggml:
            out["ggml"] = self.ggml
        return out

    @classmethod
    def from_dict(cls, data: dict, field: str = "format") -> "Format":
        try:
            bits = int(data["bits"])
        except (KeyError, TypeError, ValueError):
            raise BitallocError(f"{field}.bits", f"missing or not an integer; allowed: {_allowed_bits()}") from None
        try:
            if bits == KEEP_BITS:
                return cls(bits, scale_dtype=data.get("scale_dtype") or "float16")
            if data.get("ggml"):
                return cls.of_ggml(data["ggml"])
            return cls(bits, data.get("group_size"), bool(data.get("symmetric", False)),
                       data.get("scale_dtype", "float16"), data.get("method") or "rtn")
        except BitallocError as exc:  # named where the format was written
            raise BitallocError(exc.field.replace("format", field, 1), exc.message) from None


def _allowed_bits() -> str:
    return ", ".join(map(str, QUANT_BITS + (KEEP_BITS,)))


def layout(fmt: Format, field: str = "format"):
    """The byte layout of the format's method (`bitalloc.quantizers.layouts`)."""
    from .quantizers import layout_of

    return layout_of(fmt.method, f"{field}.method")


def validate_format(fmt: Format, field: str) -> None:
    if fmt.ggml or fmt.method == "gguf":
        if fmt.method != "gguf":
            raise BitallocError(f"{field}.ggml", f"{fmt.ggml!r}: llama.cpp's types are made by method gguf")
        if not fmt.ggml:
            raise BitallocError(f"{field}.method", "gguf makes llama.cpp's types: name them in formats.types, "
                                                   "e.g. [q4_K]")
        layout(fmt, field).check(fmt, field)
        return
    if fmt.bits not in QUANT_BITS and fmt.bits != KEEP_BITS:
        raise BitallocError(f"{field}.bits", f"{fmt.bits} is not allowed; allowed: {_allowed_bits()}")
    if not fmt.quantized:
        if fmt.scale_dtype not in ("float16", "bfloat16"):
            raise BitallocError(f"{field}.scale_dtype", "16-bit weights are stored as float16 or bfloat16")
        return
    if (not isinstance(fmt.group_size, int) or isinstance(fmt.group_size, bool)
            or not 1 <= fmt.group_size <= MAX_GROUP_SIZE):
        raise BitallocError(f"{field}.group_size", f"{fmt.group_size!r} is not allowed; use an integer from 1 to "
                                                   f"{MAX_GROUP_SIZE}, e.g. 32, 64, 128")
    if fmt.scale_dtype not in SCALE_DTYPES:
        raise BitallocError(f"{field}.scale_dtype", f"{fmt.scale_dtype!r} is not allowed; allowed: {', '.join(SCALE_DTYPES)}")
    layout(fmt, field).check(fmt, field)


def weight_bytes(out_features: int, in_features: int, fmt: Format) -> int:
    """Exact bytes to store one [out, in] weight as its runtime stores it: codes + scales + zero points (+ the
    layout's own extras), by its method's byte layout."""
    if not fmt.quantized:
        return out_features * in_features * 2
    return layout(fmt).weight_bytes(out_features, in_features, fmt)


def shape_bytes(shape, fmt: Format) -> int:
    """Bytes of a weight of `shape` at `fmt`: [out, in], or [experts, out, in] stored expert by expert."""
    *experts, out_features, in_features = (int(n) for n in shape)
    if len(experts) > 1 or min(shape) < 1:
        raise ValueError(f"{list(shape)} is not an [out, in] or [experts, out, in] shape")
    return (experts[0] if experts else 1) * weight_bytes(out_features, in_features, fmt)


def substitute(fmt: Format, in_features: int, formats: tuple[Format, ...]) -> Format | None:
    """What stands in for `fmt` on a row of `in_features` it does not fit (a uniform config's layer): `fmt` itself
    when it fits; for a ggml type, what llama-quantize stores instead; otherwise the job's fitting format with the
    fewest bits at or above fmt's (else the most bits). None when no job format fits."""
    if fmt.fits(in_features):
        return fmt
    fitting = [f for f in formats if f.fits(in_features)]
    if fmt.ggml:
        from .quantizers.gguf.ggml import stored_type

        stored = stored_type(fmt.ggml, in_features)
        match = [f for f in fitting if f.ggml == stored] if stored else [f for f in fitting if not f.quantized]
        if match:
            return match[0]
    above = [f for f in fitting if f.bits >= fmt.bits]
    if above:
        return min(above, key=lambda f: (f.bits, weight_bytes(1, in_features, f)))
    return max(fitting, key=lambda f: f.bits, default=None)
