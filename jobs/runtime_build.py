"""Build a model the way a Python runtime builds it from bitalloc's exported file, with the runtime's own code, and
write what bitalloc needs to measure it: each quantized layer's weight as the runtime computes with it (dequantized by
the runtime) and the bytes the runtime stores for it.

Runs in the runtimes' environment (`.venv-runtimes`), never imported by bitalloc: standard library, torch,
transformers, safetensors and the runtime.

    python jobs/runtime_build.py RUNTIME MODEL_DIR EXPORTED_FILE OUT_DIR [CALIBRATION.safetensors]

OUT_DIR receives `weights.safetensors` (module name -> float32 [out, in]), `stored.json` (module name -> bytes) and,
for checkpoint runtimes, the checkpoint the runtime saved. Prints one line; exits 1 with the runtime's error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch


def _save(out: Path, weights: dict[str, torch.Tensor], stored: dict[str, int]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    (out / "stored.json").write_text(json.dumps(stored))


def _stored(checkpoint: Path, counts: Callable[[str], bool]) -> dict[str, int]:
    """Bytes per layer of the checkpoint's safetensors tensors named LAYER.PART, for the parts `counts` takes."""
    from safetensors import safe_open

    stored: dict[str, int] = {}
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                layer, _, part = key.rpartition(".")
                if counts(part):
                    t = fh.get_tensor(key)
                    stored[layer] = stored.get(layer, 0) + t.numel() * t.element_size()
    return stored


def build_hqq(model_dir: str, exported: str, out: Path, calibration: str | None) -> str:
    """The exported HqqConfig arguments applied by HQQ's own model patcher (AutoHQQHFModel, per layer tag), on the
    CPU in float16 (HQQ keeps scales and zeros in the compute dtype): transformers 5 has no HQQ integration to load
    HqqConfig with. Each HQQLinear dequantized by HQQ."""
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
    _save(out, weights, stored)
    AutoHQQHFModel.save_quantized(model, str(out / "checkpoint"))
    return f"HQQ quantized {len(weights)} layers (hqq's AutoHQQHFModel, {len(tags)} layer tags)"


def build_llmcompressor(model_dir: str, exported: str, out: Path, calibration: str | None) -> str:
    """llm-compressor's `oneshot` with the exported recipe on the calibration sequences (float32), saved as a
    compressed-tensors checkpoint with the scales in the recipe's float16 (llm-compressor keeps them in the model's
    dtype), loaded back by transformers (which decompresses it); bytes are the checkpoint's tensors per layer."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ids = load_file(calibration)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    checkpoint = out / "checkpoint"
    oneshot(model=model, dataset=data, recipe=exported, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    for module in model.modules():  # scales are kept in the model's dtype: stored as the recipe's float16
        scale = getattr(module, "weight_scale", None)
        if isinstance(scale, torch.nn.Parameter):
            scale.data = scale.data.to(torch.float16)
    model.save_pretrained(str(checkpoint), save_compressed=True)
    stored = _stored(checkpoint, lambda part: part.startswith("weight_"))  # compressed-tensors' weight_packed, ...
    loaded = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    modules = dict(loaded.named_modules())
    weights = {name: modules[name].weight.detach() for name in stored}
    _save(out, weights, stored)
    return f"llm-compressor quantized {len(stored)} layers; compressed-tensors checkpoint loaded back by transformers"


def build_gptqmodel(model_dir: str, exported: str, out: Path, calibration: str | None) -> str:
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
    stored = _stored(checkpoint, lambda part: part in ("qweight", "qzeros", "scales", "g_idx"))
    weights = {}
    for name, module in model.model.named_modules():
        if name in stored and hasattr(module, "dequantize_weight"):
            w = module.dequantize_weight()
            weights[name] = w.T if w.shape == (module.in_features, module.out_features) else w
    _save(out, weights, stored)
    return f"GPTQModel quantized {len(weights)} layers"


BUILDERS = {"hqq": build_hqq, "llmcompressor": build_llmcompressor, "gptqmodel": build_gptqmodel}

if __name__ == "__main__":
    runtime, model_dir, exported, out = sys.argv[1:5]
    calibration = sys.argv[5] if len(sys.argv) > 5 else None
    try:
        print(BUILDERS[runtime](model_dir, exported, Path(out), calibration))
    except Exception as exc:  # the runtime's own error, as one line for bitalloc to show
        print(f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        raise SystemExit(1)
