"""llm-compressor's artifact: a compressed-tensors `pack-quantized` folder written from the level store, what
llm-compressor's oneshot saves and vLLM and transformers load, but with bitalloc's levels rather than a re-run GPTQ.

compressed-tensors packs a row's signed codes, offset by 2^(b-1), densely into int32 words (code k at bits
[k*b, (k+1)*b) of the row's stream): bitalloc's packed layout, so `weight_packed` is the level's words as stored;
`weight_scale` is its float16 scales, `weight_shape` the [out, in] it unpacks to. One config group per format, its
targets the anchored names of its layers; every other Linear matches none and stays at its dtype."""

from __future__ import annotations

import json
import re

import torch

from ..base import by_value, modules_matching
from ..folder import Checkpoint


def layer_tensors(level) -> dict[str, torch.Tensor]:
    return {"weight_packed": level.qweight, "weight_scale": level.scales,
            "weight_shape": torch.tensor([level.out_features, level.in_features], dtype=torch.int64)}


def quantization_config(runtime, layers, model_type, saved) -> dict:
    """compressed-tensors' `quantization_config`: one group per format (scales in the file's dtype, float16), its
    targets the modules' names and, where the file names them otherwise (each expert of an expert unit), the
    names they are saved under (`saved`: `folder.CheckpointNames`)."""
    layers = [l for l in layers if not l.embedding]
    units = {l.name: l for l in layers}
    placed = runtime.place(layers, model_type)
    groups = {}
    for i, (key, names) in enumerate(by_value(layers, placed, lambda v: v is not None).items()):
        weights = {k: v for k, v in json.loads(key).items() if k != "scale_dtype"}
        members = [units[n] for n in names]
        on_disk = _saved_matching(saved, members)
        groups[f"group_{i}"] = {"targets": [f"re:{modules_matching(members)}"] + ([f"re:{on_disk}"] if on_disk else []),
                                "weights": weights, "input_activations": None, "output_activations": None,
                                "format": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None}


def _saved_matching(saved, layers) -> str:
    """A regex matching exactly the saved names of these layers that are not their modules' (an expert unit's, with
    the expert index as `\\d+`); "" where there are none."""
    patterns = []
    for l in layers:
        names = saved.saved(l)
        if len(names) > 1:  # an expert unit's
            parts = [n.split(".") for n in names]
            at = next(i for i, p in enumerate(parts[0]) if [q[i] for q in parts] == [str(e) for e in range(len(parts))])
            patterns.append(rf"{re.escape('.'.join(parts[0][:at]))}\.\d+\.{re.escape('.'.join(parts[0][at + 1:]))}")
        else:
            patterns += [re.escape(n) for n in names if n != l.name]
    return "^(?:" + "|".join(patterns) + ")$" if patterns else ""


def checkpoint(runtime, layers, model_type, saved) -> Checkpoint:
    return Checkpoint(layer_tensors, quantization_config(runtime, layers, model_type, saved))
