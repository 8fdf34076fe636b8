"""llama.cpp: its k-, legacy and i-quants made by llama-quantize itself (the `gguf` quantizer), exported as a
`llama-quantize --tensor-type-file` and verified by llama.cpp's own tools (`measure`).

The types file has one `regex=type` per line, no comments, module names mapped to GGUF tensor names by gguf-py's
tensor name map. A ggml format (method gguf, e.g. from `formats: {target: llamacpp}`) is written as its type. Other
formats' bits map to ggml types by this rule: rows whose length is a multiple of 256 take k-quants (2->q2_K,
3->q3_K, 4->q4_K, 5->q5_K, 6->q6_K); other rows whose length is a multiple of 32 take the 32-blocks (4->q4_0
symmetric / q4_1 asymmetric, 5->q5_0 / q5_1; 2, 3 and 6 bits have no 32-block type: nearest q4_x, q4_x, q8_0);
8->q8_0; 16->f16/bf16. The block sizes are llama.cpp's, not the config's group size (k-quants use 16- or 32-wide
sub-blocks inside 256), so the file carries bits, not groups; rows of other lengths stay f16.
"""

from __future__ import annotations

import re

from bitalloc.formats import KEEP_BITS, Format
from bitalloc.quantizers.gguf.ggml import GGML_TYPES, stored_type

from ..base import Layer, Placement, Runtime, register

TYPES = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs", "q8_0")
IMATRIX_TYPES = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
K_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0"}
BLOCK32_TYPES = {(4, True): "q4_0", (4, False): "q4_1", (5, True): "q5_0", (5, False): "q5_1", (8, True): "q8_0",
                 (8, False): "q8_0"}
BLOCK32_NEAREST = {2: 4, 3: 4, 6: 8}
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
           "IQ4_NL", "IQ4_XS")
IMATRIX_PRESETS = ("IQ3_XXS", "IQ3_S")  # what llama.cpp users make only with an importance matrix


def preset_names(matrix) -> tuple[str, ...]:
    """The presets `verify --presets` measures: the i-quant ones below 4 bits only with an importance matrix."""
    return PRESETS + (IMATRIX_PRESETS if matrix else ())


def check_types(types: list[str], imatrix: bool) -> None:
    """Types bitalloc reads, and an importance matrix where a type needs one (ValueError: a spec validator's)."""
    for t in types:
        if t not in GGML_TYPES:
            raise ValueError(f"{t!r} is not a llama.cpp type bitalloc reads; allowed: {', '.join(GGML_TYPES)}")
        if GGML_TYPES[t].needs_imatrix and not imatrix:
            raise ValueError(f"{t} needs an importance matrix: set formats.params.imatrix: true")


def ggml_type(fmt: Format, in_features: int) -> Placement:
    """The ggml type for one layer by the rule in the module docstring."""
    if not fmt.quantized:
        return Placement("f16" if fmt.scale_dtype == "float16" else "bf16")
    if fmt.ggml:
        if fmt.fits(in_features):
            return Placement(fmt.ggml)
        stored = stored_type(fmt.ggml, in_features) or "f16"
        return Placement(stored, False, f"{fmt.ggml} needs rows in blocks of {GGML_TYPES[fmt.ggml].block}; rows "
                                        f"here are {in_features} wide")
    if in_features % 256 == 0:
        return Placement(K_TYPES[fmt.bits])
    if in_features % 32 == 0:
        if fmt.bits in BLOCK32_NEAREST:
            up = BLOCK32_TYPES[(BLOCK32_NEAREST[fmt.bits], fmt.symmetric)]
            return Placement(up, False, f"{fmt.bits}-bit needs 256-wide rows in llama.cpp; rows here are "
                                        f"{in_features} wide")
        return Placement(BLOCK32_TYPES[(fmt.bits, fmt.symmetric)])
    return Placement("f16", False, f"llama.cpp quantizes rows in blocks of 32; {in_features} is not a multiple")


@register("llamacpp")
class LlamaCpp(Runtime):
    summary = ("llama.cpp's k-, legacy and i-quants by llama-quantize itself, and f16; a type only where the row width "
               "takes its blocks")
    methods = ("gguf",)
    library = "gguf"
    export_file = "llama-quantize --tensor-type-file"
    presets = PRESETS
    experts = True  # blk.N.ffn_{gate,up,down}_exps, one type each (gguf-py's tensor name map)
    embeddings = True  # token_embd at any type whose blocks fit its rows (get_rows dequantizes a row)
    file_sized = True  # the GGUF's size, metadata and tokenizer included (`measure.file_bytes`)
    artifact, artifact_suffix = "file", ".gguf"  # written from the levels (`build`)
    evaluator = "llamacpp"  # candidates measured by llama.cpp's own forward (`evaluator.py`)

    def formats(self, method, params):
        types = TYPES + (IMATRIX_TYPES if params.get("imatrix") else ())
        # and f16, above q8_0: a sensitive layer can go there while others drop below
        return tuple(Format.of_ggml(t) for t in types) + (Format(KEEP_BITS, scale_dtype="float16"),)

    def place_one(self, layer: Layer) -> Placement:
        return ggml_type(layer.fmt, layer.in_features)

    def unstored(self, layer, placement) -> str:
        from .build import unstored

        return unstored(layer.fmt)

    def format_of(self, value) -> Format:
        if value in ("f16", "bf16"):
            return Format(KEEP_BITS, scale_dtype="float16" if value == "f16" else "bfloat16")
        return Format.of_ggml(value)

    def render(self, layers, placed, model_type, quantizers) -> str:
        from bitalloc.quantizers.gguf.files import tensor_names

        names = tensor_names(model_type, [l.name for l in layers], "--format")
        return "".join(f"^{re.escape(names[l.name])}$={placed[l.name].value}\n" for l in layers)

    def file_bytes(self, ws):
        from .measure import file_bytes

        return file_bytes(ws)

    def check_buildable(self, doc) -> None:
        from .build import check_storable

        check_storable(doc)

    def build(self, picked, card, out, stages):
        from bitalloc.jobs.runner import open_workspace

        from .build import build

        ws = open_workspace(picked.spec, stages)
        with stages.stage("write the GGUF"):
            return build(ws, picked, card.entries(), out)

    def prepare(self) -> None:
        from bitalloc.quantizers.gguf.tools import check_buildable

        check_buildable()

    def verify(self, ws, picked, text, work, presets, stages, recipe=False):
        from .measure import verify

        return verify(ws, picked, text, work, presets, stages)
