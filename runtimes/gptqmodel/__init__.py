"""GPTQModel (and vLLM, which loads its checkpoints): a `quantize_config.json` with base bits/group/sym plus `dynamic`
overrides, one anchored module-name regex per distinct format, and one negative rule for every other module of a
block (GPTQModel may reorder rules, so it names all but the quantized layers) so layers the config leaves in 16 bits, or
never selected, stay unquantized. 5/6-bit layers make it GPTQModel's planar `gptq_p` format. GPTQ stores fp16
scales: bf16/fp32 scales map to fp16. The GPTQ is the job's: its damping (`damp_percent`), `act_order` as static
groups, and GPTQModel's own group-aware reordering off.

Mixture-of-experts units: GPTQModel defuses transformers' fused experts (its `defuser`) into one Linear per expert
and projection (`mlp.experts.N.gate_proj`), which it quantizes and saves under those names, so a unit's rule is every
expert's projection; vLLM's fused MoE runs one scheme per MoE layer, so the target ties a block's gate, up and down
units.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from bitalloc.formats import KEEP_BITS, Format
from bitalloc.quantizers import get_quantizer

from ..base import FUSED, Layer, Placement, by_value, from_ggml, gptq_params, modules_matching, register
from ..python import PythonRuntime


@register("gptqmodel")
class GPTQModel(PythonRuntime):
    summary = ("GPTQ 2/3/4/8-bit, groups 64/128, symmetric (GPTQModel's gptq format; vLLM fuses q/k/v, gate/up and "
               "each MoE block's experts, so they share one)")
    methods = ("gptq",)
    bits = (2, 3, 4, 8)
    fused = FUSED + (r"experts\.(gate|up|down)_proj$",)  # vLLM's FusedMoE: one scheme per MoE layer
    library = "gptqmodel"
    experts = True
    export_file = "quantize_config.json"
    artifact = "folder"  # a GPTQ checkpoint written from the levels (`build`)
    file_sized = True  # the front's bytes are that folder's (`folder.folder_bytes`)

    def unstorable(self, fmt) -> str:
        # bits: what the gptq format and vLLM's GPTQ kernels run (5/6 bits are GPTQModel's gptq_p)
        return "; ".join(why for why, bad in (("GPTQ's artifact here is symmetric", not fmt.symmetric),
                                              (f"the gptq format has no {fmt.bits}-bit", fmt.bits not in self.bits),
                                              (f"GPTQ stores float16 scales, not {fmt.scale_dtype}",
                                               fmt.scale_dtype != "float16")) if bad)

    def checkpoint(self, layers, model_type, quantizers, names):
        from .build import checkpoint

        return checkpoint(self, layers, model_type, quantizers)

    def names(self, module, layers):
        from ..folder import CheckpointNames

        return CheckpointNames(module, layers, defused=True)  # its loader's module names, experts defused

    def format_of(self, value) -> Format:
        return Format(KEEP_BITS) if value is None else Format(value["bits"], value["group_size"], value["sym"],
                                                              "float16", "gptq")

    def place_one(self, layer: Layer) -> Placement:
        f = layer.fmt
        if not f.quantized:
            return Placement(None)
        if f.ggml:
            return from_ggml(layer, "GPTQ", (2, 3, 4, 8), 32)
        value = {"bits": f.bits, "group_size": f.group_size, "sym": f.symmetric}
        if f.scale_dtype != "float16":
            return Placement(value, False, f"GPTQ stores float16 scales, not {f.scale_dtype}")
        return Placement(value)

    def notes(self, layers):
        planar = [l for l in layers if l.fmt.quantized and not l.fmt.ggml and l.fmt.bits in (5, 6)]
        return super().notes(layers) + ([f"{len(planar)} layers at 5/6 bits make a gptq_p checkpoint: GPTQModel "
                                         f"loads it, vLLM does not (it runs GPTQ at 2/3/4/8 bits)"] if planar
                                        else []) + self.moe_notes(layers)

    def render(self, layers, placed, model_type, quantizers) -> str:
        groups = by_value(layers, placed, lambda v: v is not None)
        counts = Counter({k: len(v) for k, v in groups.items()})
        base = json.loads(counts.most_common(1)[0][0]) if counts else {"bits": 4, "group_size": 128, "sym": True}
        units = {l.name: l for l in layers}
        dynamic = {f"+:{modules_matching([units[n] for n in names])}": json.loads(key) for key, names in groups.items()}
        quantized = modules_matching([units[n] for names in groups.values() for n in names])
        # GPTQModel also asks its rules of a block's bare module names (`self_attn.q_proj`, `mlp.experts.0.up_proj`)
        # to pick the modules it builds: the negative rule only takes names inside the model's numbered blocks
        blocks = "|".join(sorted({re.escape(m[1]) for l in layers if (m := _BLOCK.match(l.name))}))
        dynamic[f"-:^(?=(?:{blocks})\\d+\\.)(?!{quantized.removeprefix('^')})"] = {}
        planar = any(json.loads(k)["bits"] in (5, 6) for k in groups)
        gptq = gptq_params(layers, quantizers) or get_quantizer("gptq").params()
        # bitalloc's GPTQ: its damping, its order (act_order: static groups), no group-aware reordering
        doc = {**base, "desc_act": gptq["act_order"], "static_groups": gptq["act_order"], "act_group_aware": False,
               "damp_percent": gptq["damp"], "lm_head": False, "quant_method": "gptq",
               "format": "gptq_p" if planar else "gptq", "dynamic": dynamic}
        return json.dumps(doc, indent=2) + "\n"


_BLOCK = re.compile(r"^(.*?\.)\d+\.")  # a layer's blocks' prefix (`model.layers.`)
