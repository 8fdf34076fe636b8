"""Export a bitalloc config to the files runtimes read.

Each runtime maps every layer's format to what it can express. Where it cannot express a layer
exactly, it names the nearest it can write (never fewer bits, never coarser groups); export refuses
unless asked for the nearest (`--nearest`), so a file never silently differs from the searched config.

- `gptqmodel`: a `quantize_config.json` for GPTQModel: base bits/group/sym plus `dynamic` overrides,
  one anchored module-name regex per distinct format, and one negative rule for every other module
  (GPTQModel may reorder rules, so it names all but the quantized layers) so layers the config leaves
  in 16 bits, or never selected, stay unquantized. 5/6-bit layers make it GPTQModel's planar `gptq_p`
  format. GPTQ stores fp16 scales: bf16/fp32 scales map to fp16. The GPTQ is the job's: its damping
  (`damp_percent`), `act_order` as static groups, and GPTQModel's own group-aware reordering off.
- `llmcompressor`: an llm-compressor recipe (compressed-tensors `config_groups`, in a GPTQModifier with the job's
  GPTQ parameters when the levels were made by GPTQ — damping, block, `act_order` as `actorder: weight` — else a
  QuantizationModifier): one group per distinct format, `re:`-anchored per-layer targets; 16-bit layers
  and `lm_head` in `ignore`. Zero points are stored as int8 by compressed-tensors (bitalloc counts fp16).
- `llamacpp`: a `llama-quantize --tensor-type-file` (one `regex=type` per line, no comments), module
  names mapped to GGUF tensor names by gguf-py's tensor name map. A ggml format (method gguf, e.g. from
  `formats: {target: llamacpp}`) is written as its type. Other formats' bits map to ggml types by this rule:
  rows whose length is a multiple of 256 take k-quants (2->q2_K, 3->q3_K, 4->q4_K, 5->q5_K, 6->q6_K);
  other rows whose length is a multiple of 32 take the 32-blocks (4->q4_0 symmetric / q4_1 asymmetric,
  5->q5_0 / q5_1; 2, 3 and 6 bits have no 32-block type: nearest q4_x, q4_x, q8_0); 8->q8_0; 16->f16/bf16.
  The block sizes are llama.cpp's, not the config's group size (k-quants use 16- or 32-wide sub-blocks
  inside 256), so the file carries bits, not groups; rows of other lengths stay f16.
- `hqq`: transformers' `HqqConfig` arguments: HQQ configures per layer *tag* (`self_attn.q_proj`, shared
  by all blocks), is always asymmetric and has 1/2/3/4/8 bits; a config whose blocks differ per tag
  maps each tag to its most precise format.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from bitalloc.errors import BitallocError
from bitalloc.formats import KEEP_BITS, Format
from bitalloc.ggml_types import GGML_TYPES, stored_type
from bitalloc.gguf_levels import tensor_names
from bitalloc.quantizers import get_quantizer
from bitalloc.registry import Registry
from bitalloc.targets import hqq_tag


@dataclass(frozen=True)
class Layer:
    name: str
    fmt: Format
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Placement:
    """What the runtime writes for one layer; `exact` False when it is only the nearest it can express."""

    value: Any
    exact: bool = True
    why: str = ""


RUNTIMES: Registry["Runtime"] = Registry("an export format", "--format", "--format")


class Runtime:
    name = ""
    quantizers: tuple[str, ...] = ()  # the methods whose levels are what this runtime makes and runs

    def notes(self, layers: list[Layer]) -> list[str]:
        """What differs from the front although the file expresses every format: levels another quantizer made."""
        other = Counter(l.fmt.method for l in layers if l.fmt.quantized and l.fmt.method not in self.quantizers)
        return [f"{n} layers were measured with {method} levels; {self.name} quantizes them with "
                f"{' or '.join(self.quantizers)}, "
                f"so its quality will differ from the front's (search with formats.target: {self.name} to measure "
                f"what it runs)" for method, n in other.items()]

    def place(self, layers: list[Layer], model_type: str | None) -> dict[str, Placement]:
        return {l.name: self.place_one(l) for l in layers}

    def place_one(self, layer: Layer) -> Placement:
        raise NotImplementedError

    def render(self, layers: list[Layer], placed: dict[str, Placement], model_type: str | None,
               quantizers: dict[str, dict]) -> str:
        """The file; `quantizers` are the parameters of the quantizers that made the levels (method -> params)."""
        raise NotImplementedError


def _anchored(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def _by_value(layers: list[Layer], placed: dict[str, Placement], keep: Callable[[Any], bool]) -> dict[str, list[str]]:
    """Layer names grouped by their placed value (as canonical JSON), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for l in layers:
        value = placed[l.name].value
        if keep(value):
            groups.setdefault(json.dumps(value, sort_keys=True), []).append(l.name)
    return groups


def gptq_params(layers: list[Layer], quantizers: dict[str, dict]) -> dict | None:
    """The parameters of the GPTQ that made the config's GPTQ levels (bitalloc's defaults for a config that does not
    record them); None without GPTQ levels. One file holds one GPTQ setting."""
    methods = sorted({l.fmt.method for l in layers if l.fmt.quantized and l.fmt.method in ("gptq", "gptq-ct")})
    found = {json.dumps(quantizers.get(m) or get_quantizer(m).params(), sort_keys=True) for m in methods}
    if len(found) > 1:
        raise BitallocError("--format", f"the config's levels come from GPTQ with {len(found)} different settings "
                                        f"({', '.join(methods)}); a runtime's file runs one")
    return json.loads(found.pop()) if found else None


def _from_ggml(layer: Layer, runtime: str, bits: tuple[int, ...], group: int) -> Placement:
    """A llama.cpp type's nearest in a grouped-integer runtime: at least its bits, in groups no coarser."""
    f = layer.fmt
    value = {"bits": min((b for b in bits if b >= f.bits), default=max(bits)), "group_size": group, "sym": True}
    return Placement(value, False, f"llama.cpp's {f.ggml} has no {runtime} form")


@RUNTIMES.register("gptqmodel")
class GPTQModel(Runtime):
    quantizers = ("gptq",)

    def place_one(self, layer: Layer) -> Placement:
        f = layer.fmt
        if not f.quantized:
            return Placement(None)
        if f.ggml:
            return _from_ggml(layer, "GPTQ", (2, 3, 4, 8), 32)
        value = {"bits": f.bits, "group_size": f.group_size, "sym": f.symmetric}
        if f.scale_dtype != "float16":
            return Placement(value, False, f"GPTQ stores float16 scales, not {f.scale_dtype}")
        return Placement(value)

    def render(self, layers, placed, model_type, quantizers) -> str:
        groups = _by_value(layers, placed, lambda v: v is not None)
        counts = Counter({k: len(v) for k, v in groups.items()})
        base = json.loads(counts.most_common(1)[0][0]) if counts else {"bits": 4, "group_size": 128, "sym": True}
        dynamic = {f"+:{_anchored(names)}": json.loads(key) for key, names in groups.items()}
        quantized = [n for names in groups.values() for n in names]
        dynamic[f"-:^(?!{_anchored(quantized).removeprefix('^')})"] = {}
        planar = any(json.loads(k)["bits"] in (5, 6) for k in groups)
        gptq = gptq_params(layers, quantizers) or get_quantizer("gptq").params()
        # bitalloc's GPTQ: its damping, its order (act_order: static groups), no group-aware reordering
        doc = {**base, "desc_act": gptq["act_order"], "static_groups": gptq["act_order"], "act_group_aware": False,
               "damp_percent": gptq["damp"], "lm_head": False, "quant_method": "gptq",
               "format": "gptq_p" if planar else "gptq", "dynamic": dynamic}
        return json.dumps(doc, indent=2) + "\n"


@RUNTIMES.register("llmcompressor")
class LLMCompressor(Runtime):
    quantizers = ("gptq-ct", "rtn-int")

    def place_one(self, layer: Layer) -> Placement:
        f = layer.fmt
        if not f.quantized:
            return Placement(None)
        if f.ggml:
            near = _from_ggml(layer, "compressed-tensors", (4, 8), 32).value
            return Placement({"num_bits": near["bits"], "type": "int", "symmetric": True, "strategy": "group",
                              "group_size": 32, "scale_dtype": "float16"}, False,
                             f"llama.cpp's {f.ggml} has no compressed-tensors form")
        return Placement({"num_bits": f.bits, "type": "int", "symmetric": f.symmetric, "strategy": "group",
                          "group_size": f.group_size, "scale_dtype": f.scale_dtype})

    def render(self, layers, placed, model_type, quantizers) -> str:
        groups = _by_value(layers, placed, lambda v: v is not None)
        config_groups = {f"group_{i}": {"targets": [f"re:{_anchored(names)}"], "weights": json.loads(key)}
                         for i, (key, names) in enumerate(groups.items())}
        ignore = ["lm_head"] + [f"re:{_anchored([l.name])}" for l in layers if placed[l.name].value is None]
        modifier = {"targets": ["Linear"], "ignore": ignore, "config_groups": config_groups}
        gptq = gptq_params(layers, quantizers)  # GPTQ levels: llm-compressor's GPTQ too, with their parameters
        if gptq:
            modifier.update(dampening_frac=gptq["damp"], block_size=gptq["block"],
                            actorder="weight" if gptq["act_order"] else None)
        name = "GPTQModifier" if gptq else "QuantizationModifier"
        recipe = {"quant_stage": {"quant_modifiers": {name: modifier}}}
        return yaml.safe_dump(recipe, sort_keys=False)


K_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0"}
BLOCK32_TYPES = {(4, True): "q4_0", (4, False): "q4_1", (5, True): "q5_0", (5, False): "q5_1", (8, True): "q8_0",
                 (8, False): "q8_0"}
BLOCK32_NEAREST = {2: 4, 3: 4, 6: 8}


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


@RUNTIMES.register("llamacpp")
class LlamaCpp(Runtime):
    quantizers = ("gguf",)

    def place_one(self, layer: Layer) -> Placement:
        return ggml_type(layer.fmt, layer.in_features)

    def render(self, layers, placed, model_type, quantizers) -> str:
        names = tensor_names(model_type, [l.name for l in layers], "--format")
        return "".join(f"^{re.escape(names[l.name])}$={placed[l.name].value}\n" for l in layers)


HQQ_BITS = (1, 2, 3, 4, 8)


@RUNTIMES.register("hqq")
class HQQ(Runtime):
    quantizers = ("hqq",)

    def place(self, layers, model_type) -> dict[str, Placement]:
        by_tag: dict[str, list[Layer]] = {}
        for l in layers:
            by_tag.setdefault(hqq_tag(l.name), []).append(l)
        placed = {}
        for tag, members in by_tag.items():
            own = [self._one(l) for l in members]
            quantized = [p for p in own if p.value is not None]
            if not quantized:
                placed.update({l.name: Placement(None) for l in members})
                continue
            bits = max(p.value["nbits"] for p in quantized)
            group = min(p.value["group_size"] for p in quantized)
            shared = {"nbits": bits, "group_size": group}
            for l, p in zip(members, own):
                if p.value == shared:
                    placed[l.name] = p
                else:
                    why = p.why or (f"HQQ sets one format per layer tag; {tag} differs across blocks" if p.value
                                    else f"HQQ cannot keep one {tag} in 16 bits while quantizing the others")
                    placed[l.name] = Placement(shared, False, why)
        return placed

    def _one(self, layer: Layer) -> Placement:
        f = layer.fmt
        if not f.quantized:
            return Placement(None)
        if f.ggml:
            near = _from_ggml(layer, "HQQ", HQQ_BITS, 32).value
            return Placement({"nbits": near["bits"], "group_size": 32}, False, f"llama.cpp's {f.ggml} has no HQQ form")
        bits = min(b for b in HQQ_BITS if b >= f.bits)
        group = max(d for d in range(1, f.group_size + 1) if layer.in_features % d == 0)
        value = {"nbits": bits, "group_size": group}
        reasons = [r for r, bad in ((f"HQQ has no {f.bits}-bit", bits != f.bits),
                                    (f"HQQ groups must divide the row ({layer.in_features})", group != f.group_size),
                                    ("HQQ is asymmetric (scale and zero point)", f.symmetric),
                                    (f"HQQ keeps scales in the compute dtype, not {f.scale_dtype}",
                                     f.scale_dtype == "float32")) if bad]
        return Placement(value, not reasons, "; ".join(reasons))

    def render(self, layers, placed, model_type, quantizers) -> str:
        dynamic, skip = {}, ["lm_head"]
        for l in layers:
            tag = hqq_tag(l.name)
            if placed[l.name].value is None:
                skip.append(tag)
            else:
                dynamic[tag] = placed[l.name].value
        doc = {"dynamic_config": dynamic, "skip_modules": sorted(set(skip) - set(dynamic))}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def notes(runtime_name: str, layers: list[Layer]) -> list[str]:
    return RUNTIMES.create(runtime_name).notes(layers)


def export(runtime_name: str, layers: list[Layer], model_type: str | None, nearest: bool,
           quantizers: dict[str, dict] | None = None) -> tuple[str, list[str]]:
    """The runtime's file text, and one line per layer written only as the nearest it can express.

    Without `nearest`, a config the runtime cannot express is an error that names the nearest."""
    runtime = RUNTIMES.create(runtime_name)
    placed = runtime.place(layers, model_type)
    changed = [f"{l.name}: {l.fmt.name} -> {_show(placed[l.name].value)} ({placed[l.name].why})"
               for l in layers if not placed[l.name].exact]
    if changed and not nearest:
        raise BitallocError("--format", f"{runtime_name} cannot express {len(changed)} of {len(layers)} layers "
                                        f"exactly, e.g. {changed[0]}; the nearest it can write raises those; "
                                        f"pass --nearest to write it")
    return runtime.render(layers, placed, model_type, quantizers or {}), changed


def _show(value: Any) -> str:
    if value is None:
        return f"{KEEP_BITS}-bit"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)
