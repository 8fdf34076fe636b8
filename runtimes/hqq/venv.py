"""HQQ's side in the runtimes' environment (see runtimes/venv.py): transformers' `HqqConfig` reads the exported
arguments; HQQ's own model patcher builds the point."""

from __future__ import annotations

import json
from pathlib import Path

from bitalloc_venv import save_weights

LIBRARY = "hqq"


def check(path: str, config: dict | None) -> str:
    from transformers import HqqConfig

    with open(path) as fh:
        doc = json.load(fh)
    cfg = HqqConfig(**doc)
    return f"transformers HqqConfig: {len(cfg.quant_config)} layer tags, skip {cfg.skip_modules}"


def build(model_dir: str, exported: str, out: Path, calibration: str | None) -> str:
    """The exported HqqConfig arguments applied by HQQ's own model patcher (AutoHQQHFModel, per layer tag), on the
    CPU in float16 (HQQ keeps scales and zeros in the compute dtype): transformers 5 has no HQQ integration to load
    HqqConfig with. Each HQQLinear dequantized by HQQ."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    doc = json.loads(Path(exported).read_text())
    tags = {tag: BaseQuantizeConfig(nbits=c["nbits"], group_size=c["group_size"])
            for tag, c in doc["dynamic_config"].items()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    AutoHQQHFModel.quantize_model(model, quant_config=tags, compute_dtype=torch.float16, device="cpu")
    weights, stored = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            weights[name] = module.dequantize().reshape(module.meta["shape"])
            meta = [module.meta[k] for k in ("scale", "zero") if torch.is_tensor(module.meta.get(k))]
            stored[name] = module.W_q.numel() * module.W_q.element_size() + sum(t.numel() * t.element_size()
                                                                                for t in meta)
    save_weights(out, weights, stored)
    AutoHQQHFModel.save_quantized(model, str(out / "checkpoint"))
    return f"HQQ quantized {len(weights)} layers (hqq's AutoHQQHFModel, {len(tags)} layer tags)"
