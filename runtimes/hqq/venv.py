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


def write(model_dir: str, exported: str, levels: str, out: Path) -> str:
    """HQQ's saved model (`AutoHQQHFModel.save_quantized`: `qmodel.pt` and `config.json`) holding the job's levels:
    HQQ's own patcher lays out each HQQLinear (quantizing round-to-nearest, a scaffold), whose packed codes, scales
    and zero points are then replaced by the levels' (`levels`: LAYER.codes [out, in], .scale and .zero [out,
    groups], HQQ's (q - zero) * scale); the rest of the model in float16, HQQ's compute dtype."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
    from hqq.models.hf.base import AutoHQQHFModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    doc = json.loads(Path(exported).read_text())
    tags = {tag: BaseQuantizeConfig(nbits=c["nbits"], group_size=c["group_size"])
            for tag, c in doc["dynamic_config"].items()}
    for cfg in tags.values():
        cfg["weight_quant_params"]["optimize"] = False  # a scaffold: the levels replace what it makes
    ours = load_file(levels)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    AutoHQQHFModel.quantize_model(model, quant_config=tags, compute_dtype=torch.float16, device="cpu")
    written = 0
    for name, module in model.named_modules():
        if not isinstance(module, HQQLinear):
            continue
        if f"{name}.codes" not in ours:
            raise ValueError(f"HQQ quantized {name}, which the point keeps unquantized")
        meta, gs = module.meta, int(module.meta["group_size"])
        codes = ours[f"{name}.codes"].reshape(-1, gs)
        module.W_q.data = Quantizer.pack[meta["packing"]](codes).to(module.W_q.dtype)
        meta["scale"] = ours[f"{name}.scale"].reshape(-1, 1).to(meta["scale"].dtype)
        meta["zero"] = ours[f"{name}.zero"].reshape(-1, 1).to(meta["zero"].dtype)
        meta["optimize"] = True  # the levels are HQQ's optimised ones
        module.quant_config["weight_quant_params"]["optimize"] = True
        written += 1
    missing = sorted({k.rsplit(".", 1)[0] for k in ours} - {n for n, m in model.named_modules()
                                                             if isinstance(m, HQQLinear)})
    if missing:
        raise ValueError(f"HQQ left {len(missing)} layers of the point unquantized, e.g. {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    AutoHQQHFModel.save_quantized(model, str(out))
    return f"HQQ saved {written} layers with the job's levels (AutoHQQHFModel.save_quantized)"


def load(artifact: str, out: Path) -> str:
    """HQQ's saved model as HQQ loads it (`AutoHQQHFModel.from_quantized`, CPU, float16), each HQQLinear dequantized
    by HQQ; bytes are its packed codes, scales and zero points."""
    import torch
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    model = AutoHQQHFModel.from_quantized(artifact, compute_dtype=torch.float16, device="cpu")
    weights, stored = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            weights[name] = module.dequantize().reshape(module.meta["shape"])
            stored[name] = sum(t.numel() * t.element_size() for t in (module.W_q, module.meta["scale"],
                                                                      module.meta["zero"]))
    save_weights(out, weights, stored)
    return f"HQQ loaded {len(weights)} layers (AutoHQQHFModel.from_quantized)"
