"""Runtime targets: the formats a runtime stores and runs, the quantizer that makes them as the runtime would, and the
layers the runtime makes share a format. `formats: {target: NAME}` searches exactly this; a config found this way
exports to its runtime as it is (no `--nearest`).

Which formats fit which layer is the formats' own rule (`Format.fits`: whole ggml blocks, whole GPTQ/HQQ groups);
layers a target ties are chosen together (`ties`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .formats import Format
from .ggml_types import GGML_TYPES
from .model import QuantizableLayer

LLAMACPP_TYPES = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs", "q8_0")
LLAMACPP_IMATRIX_TYPES = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
FUSED = (r"self_attn\.[qkv]_proj$", r"mlp\.(gate|up)_proj$")  # vLLM's qkv_proj and gate_up_proj


def hqq_tag(name: str) -> str:
    """transformers' HQQ layer tag: the module name without `model`, `layers` and block indices."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())


@dataclass(frozen=True)
class Target:
    name: str
    methods: tuple[str, ...]  # the first is the default
    summary: str
    bits: tuple[int, ...] = ()
    group_sizes: tuple[int, ...] = (64, 128)
    symmetric: bool = True
    fused: tuple[str, ...] = ()  # patterns tied under one parent module
    by_tag: bool = False  # one format per layer tag across blocks (transformers' HqqConfig)

    def formats(self, method: str, params: dict) -> tuple[Format, ...]:
        if method == "gguf":
            types = LLAMACPP_TYPES + (LLAMACPP_IMATRIX_TYPES if params.get("imatrix") else ())
            return tuple(Format.of_ggml(t) for t in types)
        return tuple(Format(b, g, self.symmetric, "float16", method) for b in self.bits for g in self.group_sizes)

    def ties(self, layers: list[QuantizableLayer]) -> list[tuple[int, ...]]:
        """Layer indices that must share a format."""
        groups: dict[str, list[int]] = {}
        for i, layer in enumerate(layers):
            if self.by_tag:
                groups.setdefault(hqq_tag(layer.name), []).append(i)
                continue
            for k, pattern in enumerate(self.fused):
                if re.search(pattern, layer.name):
                    groups.setdefault(f"{k}|{layer.name.rsplit('.', 1)[0]}", []).append(i)
        return [tuple(g) for g in groups.values() if len(g) > 1]


TARGETS = {t.name: t for t in (
    Target("llamacpp", ("gguf",), "llama.cpp's k-, legacy and i-quants by llama-quantize itself; a type only where "
                                  "the row width takes its blocks"),
    Target("gptqmodel", ("gptq",), "GPTQ 2/3/4/8-bit, groups 64/128, symmetric (GPTQModel's gptq format; "
                                         "vLLM fuses q/k/v and gate/up, so they share one)", (2, 3, 4, 8), (64, 128),
           True, FUSED),
    Target("llmcompressor", ("gptq-ct", "rtn-int"), "GPTQ or RTN W4A16/W8A16, groups 64/128, symmetric "
                                                  "(compressed-tensors pack-quantized; q/k/v and gate/up share one)",
           (4, 8), (64, 128), True, FUSED),
    Target("hqq", ("hqq",), "HQQ 2/3/4/8-bit, groups 64/128, asymmetric; one format per layer tag (transformers' "
                            "HqqConfig)", (2, 3, 4, 8), (64, 128), False, by_tag=True),
    Target("bitalloc", ("clip", "rtn"), "bitalloc's packed kernels: 2-8 bits, group 64, asymmetric",
           (2, 3, 4, 5, 6, 8), (64,), False),
)}


def check_types(types: list[str], imatrix: bool, field: str = "formats.types") -> None:
    for t in types:
        if t not in GGML_TYPES:
            raise ValueError(f"{t!r} is not a llama.cpp type bitalloc reads; allowed: {', '.join(GGML_TYPES)}")
        if GGML_TYPES[t].needs_imatrix and not imatrix:
            raise ValueError(f"{t} needs an importance matrix: set formats.params.imatrix: true")
