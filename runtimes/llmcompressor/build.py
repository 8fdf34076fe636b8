"""llm-compressor's artifact: a compressed-tensors `pack-quantized` folder written from the level store, what
llm-compressor's oneshot saves and vLLM and transformers load, but with bitalloc's levels rather than a re-run GPTQ.

compressed-tensors packs a row's signed codes, offset by 2^(b-1), densely into int32 words (code k at bits
[k*b, (k+1)*b) of the row's stream): bitalloc's packed layout, so `weight_packed` is the level's words as stored;
`weight_scale` is its float16 scales, `weight_shape` the [out, in] it unpacks to. One config group per format, its
targets the anchored names of its layers; every other Linear matches none and stays at its dtype."""

from __future__ import annotations

import json

import torch

from ..base import by_value
from ..folder import Checkpoint


def layer_tensors(level) -> dict[str, torch.Tensor]:
    return {"weight_packed": level.qweight, "weight_scale": level.scales,
            "weight_shape": torch.tensor([level.out_features, level.in_features], dtype=torch.int64)}


def quantization_config(runtime, layers, model_type) -> dict:
    """compressed-tensors' `quantization_config`: one group per format (scales in the file's dtype, float16)."""
    from . import _matching

    layers = [l for l in layers if not l.embedding]
    units = {l.name: l for l in layers}
    placed = runtime.place(layers, model_type)
    groups = {}
    for i, (key, names) in enumerate(by_value(layers, placed, lambda v: v is not None).items()):
        weights = {k: v for k, v in json.loads(key).items() if k != "scale_dtype"}
        groups[f"group_{i}"] = {"targets": [f"re:{_matching([units[n] for n in names])}"], "weights": weights,
                                "input_activations": None, "output_activations": None, "format": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None}


def checkpoint(runtime, layers, model_type) -> Checkpoint:
    return Checkpoint(layer_tensors, quantization_config(runtime, layers, model_type))
