"""llm-compressor (vLLM through compressed-tensors): an llm-compressor recipe (compressed-tensors `config_groups`, in a
GPTQModifier with the job's GPTQ parameters when the levels were made by GPTQ — damping, block, `act_order` as
`actorder: weight` — else a QuantizationModifier): one group per distinct format, `re:`-anchored per-layer targets;
16-bit layers and `lm_head` in `ignore`. Zero points are stored as int8 by compressed-tensors (bitalloc counts fp16).

Mixture-of-experts units: llm-compressor calibrates and saves experts one by one (`linearize_moe` turns transformers'
fused 3-D experts into `experts.N.gate_proj` / `up_proj` / `down_proj` Linear modules), so a unit's target is every
expert's projection (`re:` with the expert index as `\\d+`); vLLM's fused MoE runs one scheme per MoE layer, so the
target ties a block's gate, up and down units.
"""

from __future__ import annotations

import json

import yaml

from bitalloc.formats import KEEP_BITS, Format

from ..base import FUSED, Layer, Placement, by_value, from_ggml, gptq_params, modules_matching, register
from ..python import PythonRuntime


@register("llmcompressor")
class LLMCompressor(PythonRuntime):
    summary = ("GPTQ or RTN W4A16/W8A16, groups 64/128, symmetric (compressed-tensors pack-quantized; q/k/v, "
               "gate/up and each MoE block's experts share one)")
    methods = ("gptq-ct", "rtn-int")
    bits = (4, 8)
    fused = FUSED + (r"experts\.(gate|up|down)_proj$",)  # vLLM's FusedMoE: one scheme per MoE layer
    library = "llmcompressor"
    experts = True
    export_file = "llm-compressor recipe"
    artifact = "folder"  # a compressed-tensors checkpoint written from the levels (`build`)
    file_sized = True  # the front's bytes are that folder's (`folder.folder_bytes`)

    def unstorable(self, fmt) -> str:
        return "" if fmt.symmetric else "compressed-tensors stores integer zero points, the levels float zero terms"

    def checkpoint(self, layers, model_type, quantizers, names):
        from .build import checkpoint

        return checkpoint(self, layers, model_type, names)

    def format_of(self, value) -> Format:
        return Format(KEEP_BITS) if value is None else Format(value["num_bits"], value["group_size"],
                                                              value["symmetric"], "float16", self.methods[0])

    def place_one(self, layer: Layer) -> Placement:
        f = layer.fmt
        if not f.quantized:
            return Placement(None)
        if f.ggml:
            near = from_ggml(layer, "compressed-tensors", (4, 8), 32).value
            return Placement({"num_bits": near["bits"], "type": "int", "symmetric": True, "strategy": "group",
                              "group_size": 32, "scale_dtype": "float16"}, False,
                             f"llama.cpp's {f.ggml} has no compressed-tensors form")
        return Placement({"num_bits": f.bits, "type": "int", "symmetric": f.symmetric, "strategy": "group",
                          "group_size": f.group_size, "scale_dtype": f.scale_dtype})

    def notes(self, layers):
        # llm-compressor and transformers load any of these bits; vLLM's compressed-tensors WNA16 kernels run 4 and 8
        off = [l for l in layers if l.fmt.quantized and not l.fmt.ggml and l.fmt.bits not in self.bits]
        return super().notes(layers) + ([f"{len(off)} layers at bits other than 4 or 8: llm-compressor and "
                                         f"transformers load them, vLLM does not (search with formats.target: "
                                         f"llmcompressor for a vLLM model)"] if off else []) + self.moe_notes(layers)

    def render(self, layers, placed, model_type, quantizers) -> str:
        groups = by_value(layers, placed, lambda v: v is not None)
        units = {l.name: l for l in layers}
        config_groups = {f"group_{i}": {"targets": [f"re:{modules_matching([units[n] for n in names])}"],
                                        "weights": json.loads(key)}
                         for i, (key, names) in enumerate(groups.items())}
        ignore = ["lm_head"] + [f"re:{modules_matching([l])}" for l in layers if placed[l.name].value is None]
        modifier = {"targets": ["Linear"], "ignore": ignore, "config_groups": config_groups}
        gptq = gptq_params(layers, quantizers)  # GPTQ levels: llm-compressor's GPTQ too, with their parameters
        if gptq:
            modifier.update(dampening_frac=gptq["damp"], block_size=gptq["block"],
                            actorder="weight" if gptq["act_order"] else None)
        name = "GPTQModifier" if gptq else "QuantizationModifier"
        recipe = {"quant_stage": {"quant_modifiers": {name: modifier}}}
        return yaml.safe_dump(recipe, sort_keys=False)

