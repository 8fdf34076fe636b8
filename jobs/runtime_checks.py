"""Check an exported file with the target runtime's own parser or config model.

Imports only the standard library and the target library, so it also runs as a script in an
environment that has the runtime but not bitalloc (the test suite keeps one: `.venv-runtimes`):

    python jobs/runtime_checks.py FORMAT FILE [BITALLOC_CONFIG.json]

With a bitalloc config it also checks, layer by layer, that the runtime resolves each quantized
layer to the config's bits and group size, and that the runtime's GPTQ runs with the parameters of the GPTQ that
made the config's levels. Prints one line; exits 1 on a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys

LIBRARIES = {"gptqmodel": "gptqmodel", "llmcompressor": "llmcompressor", "hqq": "hqq", "llamacpp": "gguf"}


def available(fmt: str) -> bool:
    return fmt in LIBRARIES and importlib.util.find_spec(LIBRARIES[fmt]) is not None


def _quantized(config: dict | None) -> dict[str, dict]:
    return {n: f for n, f in (config or {}).get("layers", {}).items() if f["bits"] != 16}


def _gptq(config: dict | None) -> dict | None:
    """The parameters of the config's GPTQ (method gptq or gptq-ct), as it records them."""
    for method, params in (config or {}).get("quantizers", {}).items():
        if method in ("gptq", "gptq-ct"):
            return params
    return None


def _same(runtime: str, read: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if read[key] != value:
            raise ValueError(f"{runtime} reads {key} {read[key]!r}, the levels were made with {value!r}")


def check_gptqmodel(path: str, config: dict | None) -> str:
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import dynamic_get

    with open(path) as fh:
        cfg = QuantizeConfig.from_quant_config(json.load(fh))
    for name, f in _quantized(config).items():
        got = (dynamic_get(cfg.dynamic, name, "bits", cfg.bits), dynamic_get(cfg.dynamic, name, "group_size",
                                                                              cfg.group_size))
        if got != (f["bits"], f["group_size"]):
            raise ValueError(f"{name}: GPTQModel resolves {got}, the config says {(f['bits'], f['group_size'])}")
    for name, f in (config or {}).get("layers", {}).items():
        if f["bits"] == 16 and dynamic_get(cfg.dynamic, name) is not False:
            raise ValueError(f"{name}: kept in 16 bits by the config but not skipped by GPTQModel")
    gptq = _gptq(config)
    if gptq:
        _same("GPTQModel", {"damp_percent": cfg.damp_percent, "desc_act": cfg.desc_act,
                            "static_groups": cfg.static_groups, "act_group_aware": cfg.act_group_aware},
              {"damp_percent": gptq["damp"], "desc_act": gptq["act_order"], "static_groups": gptq["act_order"],
               "act_group_aware": False})
    return f"GPTQModel QuantizeConfig: bits {cfg.bits}, {len(cfg.dynamic or {})} dynamic rules, format {cfg.format}"


def check_llmcompressor(path: str, config: dict | None) -> str:
    from compressed_tensors.utils import match_name
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(path)
    modifier = recipe.modifiers[0]
    for name, f in _quantized(config).items():
        hits = [g for g in modifier.config_groups.values() if any(match_name(name, t) for t in g.targets)]
        if len(hits) != 1 or (hits[0].weights.num_bits, hits[0].weights.group_size) != (f["bits"], f["group_size"]):
            raise ValueError(f"{name}: matched by {len(hits)} groups, or with other bits than {f['bits']}")
    gptq = _gptq(config)
    if gptq:
        actorder = getattr(modifier, "actorder", None)
        _same("llm-compressor", {"dampening_frac": getattr(modifier, "dampening_frac", None),
                                 "block_size": getattr(modifier, "block_size", None),
                                 "actorder": None if actorder is None else str(getattr(actorder, "value", actorder))},
              {"dampening_frac": gptq["damp"], "block_size": gptq["block"],
               "actorder": "weight" if gptq["act_order"] else None})
    return f"llm-compressor recipe: {type(modifier).__name__} with {len(modifier.config_groups)} config groups"


def check_hqq(path: str, config: dict | None) -> str:
    from transformers import HqqConfig

    with open(path) as fh:
        doc = json.load(fh)
    cfg = HqqConfig(**doc)
    return f"transformers HqqConfig: {len(cfg.quant_config)} layer tags, skip {cfg.skip_modules}"


def check_llamacpp(path: str, config: dict | None) -> str:
    import gguf

    types = {t.name.lower(): t for t in gguf.GGMLQuantizationType}
    n = 0
    with open(path) as fh:
        for i, line in enumerate(fh.read().split(), 1):
            pattern, sep, typ = line.rpartition("=")
            if not sep or not pattern or typ.lower() not in types:
                raise ValueError(f"entry {i} {line!r} is not REGEX=TYPE with a ggml type")
            re.compile(pattern)
            n += 1
    return f"llama-quantize tensor types: {n} REGEX=TYPE entries, every type known to gguf {gguf.__name__}"


CHECKS = {"gptqmodel": check_gptqmodel, "llmcompressor": check_llmcompressor, "hqq": check_hqq,
          "llamacpp": check_llamacpp}


def check(fmt: str, path: str, config: dict | None = None) -> str:
    """A line saying what the runtime's parser accepted; raises ValueError (or the library's error) if not."""
    return CHECKS[fmt](path, config)


if __name__ == "__main__":
    fmt, path = sys.argv[1], sys.argv[2]
    config = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    try:
        print(check(fmt, path, config))
    except Exception as exc:
        print(f"rejected: {type(exc).__name__}: {exc}")
        raise SystemExit(1)
