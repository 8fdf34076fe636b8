"""GPTQModel's side in the runtimes' environment (see runtimes/venv.py): its `QuantizeConfig` reads the exported
file; its own quantize builds the point."""

from __future__ import annotations

import json
from pathlib import Path

from bitalloc_venv import gptq_of, modules_of, quantized_layers, same, save_weights, stored_bytes

LIBRARY = "gptqmodel"
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # a GPTQ layer's tensors in its checkpoint


def check(path: str, config: dict | None) -> str:
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import dynamic_get

    with open(path) as fh:
        cfg = QuantizeConfig.from_quant_config(json.load(fh))
    shapes = (config or {}).get("shapes", {})
    for unit, f in quantized_layers(config).items():
        for name in modules_of(unit, shapes.get(unit, ())):
            got = (dynamic_get(cfg.dynamic, name, "bits", cfg.bits), dynamic_get(cfg.dynamic, name, "group_size",
                                                                                  cfg.group_size))
            if got != (f["bits"], f["group_size"]):
                raise ValueError(f"{name}: GPTQModel resolves {got}, the config says {(f['bits'], f['group_size'])}")
    for unit, f in (config or {}).get("layers", {}).items():
        for name in modules_of(unit, shapes.get(unit, ())):
            if f["bits"] == 16 and dynamic_get(cfg.dynamic, name) is not False:
                raise ValueError(f"{name}: kept in 16 bits by the config but not skipped by GPTQModel")
    gptq = gptq_of(config)
    if gptq:
        same("GPTQModel", {"damp_percent": cfg.damp_percent, "desc_act": cfg.desc_act,
                           "static_groups": cfg.static_groups, "act_group_aware": cfg.act_group_aware},
             {"damp_percent": gptq["damp"], "desc_act": gptq["act_order"], "static_groups": gptq["act_order"],
              "act_group_aware": False})
    return f"GPTQModel QuantizeConfig: bits {cfg.bits}, {len(cfg.dynamic or {})} dynamic rules, format {cfg.format}"


def build(model_dir: str, exported: str, out: Path, calibration: str | None) -> str:
    """GPTQModel's own quantize with the exported `dynamic` config on the calibration sequences, saved as its
    checkpoint; each quantized module dequantized by GPTQModel; bytes are the checkpoint's tensors per layer."""
    import importlib.metadata
    import os

    # GPTQModel sizes its CPU thread pools from the core count and refuses its own default on 2 cores
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    config = QuantizeConfig.from_quant_config(json.loads(Path(exported).read_text()))
    ids = load_file(calibration)["input_ids"]
    model = GPTQModel.load(model_dir, config, device="cpu")
    try:
        model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids])
    except Exception as exc:
        raise RuntimeError(f"GPTQModel {importlib.metadata.version('gptqmodel')} cannot quantize on this machine's "
                           f"CPU: {type(exc).__name__}: {exc}") from None
    checkpoint = out / "checkpoint"
    model.save(str(checkpoint))
    stored = stored_bytes(checkpoint, lambda part: part in PARTS)
    weights = _dequantized(model, stored)
    save_weights(out, weights, stored)
    return f"GPTQModel quantized {len(weights)} layers"


def load(artifact: str, out: Path) -> str:
    """A GPTQ checkpoint as GPTQModel loads it on a CPU (its torch kernel, in float16: the scales' dtype, where its
    CPU default, bfloat16, rounds every weight to 8 bits), each quantized module dequantized by GPTQModel; bytes
    are the checkpoint's tensors per layer."""
    import os

    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import BACKEND, GPTQModel

    stored = stored_bytes(Path(artifact), lambda part: part in PARTS)
    model = GPTQModel.load(artifact, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights = _dequantized(model, stored)
    save_weights(out, weights, stored)
    return f"GPTQModel loaded {len(weights)} GPTQ layers (its torch kernel)"


def _dequantized(model, stored) -> dict:
    weights = {}
    for name, module in model.model.named_modules():
        if name in stored and hasattr(module, "dequantize_weight"):
            w = module.dequantize_weight()
            weights[name] = w.T if w.shape == (module.in_features, module.out_features) else w
    return weights
