"""Packed checkpoints: a model with its chosen layers as `QuantLinear`s, saved as safetensors.

A checkpoint folder holds `model.safetensors` (packed words, scales, zero points, and every other
tensor as it was), the transformers config and tokenizer, and `bitalloc_config.json` (the canonical
config it was packed from). `load_packed(DIR)` rebuilds the model from those alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.model import LoadedModel, list_layers

from .packed import pack_weight
from .quant_linear import QuantLinear
from .rtn import fake_quantize

CONFIG_FILE = "bitalloc_config.json"
WEIGHTS_FILE = "model.safetensors"


def quantize_model(model: LoadedModel, assignment: dict[str, Format]) -> int:
    """Swap each quantized layer for a QuantLinear (16-bit layers are rounded to their 16-bit dtype, as the
    evaluator does); returns the packed bytes of the quantized layers."""
    layers = {l.name: l for l in list_layers(model)}
    total = 0
    for name, fmt in assignment.items():
        module = model.layer_module(name)
        if not fmt.quantized:
            module.weight.data = fake_quantize(module.weight.data, fmt)
            continue
        packed = pack_weight(model.weight(layers[name]), fmt)
        total += packed.nbytes
        model.module.set_submodule(name, QuantLinear.from_packed(packed, module.bias, module.weight.dtype))
    return total


def _empty_quant_layers(model: LoadedModel, assignment: dict[str, Format]) -> None:
    layers = {l.name: l for l in list_layers(model)}
    for name, fmt in assignment.items():
        if fmt.quantized:
            spec, module = layers[name], model.layer_module(name)
            model.module.set_submodule(name, QuantLinear(spec.in_features, spec.out_features, fmt,
                                                         module.bias is not None, module.weight.dtype))


def save_packed(model: LoadedModel, config_doc: dict, out: Path) -> None:
    """Write the (already quantized) model into OUT, atomically: a staging folder renamed when complete."""
    from safetensors.torch import save_model

    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model.module, str(staging / WEIGHTS_FILE))
    model.module.config.save_pretrained(staging)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(staging)
    configio.write(config_doc, staging / CONFIG_FILE)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def load_packed(path: str | Path) -> LoadedModel:
    """The model of a packed checkpoint, its chosen layers as QuantLinears, ready for inference."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise BitallocError("DIR", f"{str(path)!r} is not a packed checkpoint (no {CONFIG_FILE} / {WEIGHTS_FILE})")
    doc = configio.read(path / CONFIG_FILE, configio.CONFIG_SCHEMA)
    config = AutoConfig.from_pretrained(path)
    with safe_open(str(path / WEIGHTS_FILE), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    dtype = torch.float32 if "F32" in dtypes else torch.float16 if "F16" in dtypes else torch.bfloat16
    module = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    model = LoadedModel(module, tokenizer, str(path))
    _empty_quant_layers(model, configio.config_formats(doc))
    missing, unexpected = load_model(module, str(path / WEIGHTS_FILE), strict=False)
    tied = {k for k in missing if k.endswith("weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise BitallocError("DIR", f"{WEIGHTS_FILE} does not match its config: missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]}")
    module.tie_weights()
    module.eval()
    return model
