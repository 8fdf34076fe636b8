"""llm-compressor's side in the runtimes' environment (see runtimes/venv.py): its `Recipe` reads the exported recipe;
its `oneshot` builds the point, saved as compressed-tensors and loaded back by transformers. A mixture of experts is
linearized first (`linearize_moe`: one Linear per expert and projection, as llm-compressor calibrates and saves it);
transformers does not load such a checkpoint back into fused experts, so its tensors are read from the files and
decompressed by compressed-tensors' own compressor, each expert's weight stacked into its unit."""

from __future__ import annotations

import re
from pathlib import Path

from bitalloc_venv import gptq_of, modules_of, quantized_layers, same, save_weights, stored_bytes

LIBRARY = "llmcompressor"


def check(path: str, config: dict | None) -> str:
    from compressed_tensors.utils import match_name
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(path)
    modifier = recipe.modifiers[0]
    shapes = (config or {}).get("shapes", {})
    for unit, f in quantized_layers(config).items():
        for name in modules_of(unit, shapes.get(unit, ())):
            hits = [g for g in modifier.config_groups.values() if any(match_name(name, t) for t in g.targets)]
            if len(hits) != 1 or (hits[0].weights.num_bits, hits[0].weights.group_size) != (f["bits"],
                                                                                             f["group_size"]):
                raise ValueError(f"{name}: matched by {len(hits)} groups, or with other bits than {f['bits']}")
    gptq = gptq_of(config)
    if gptq:
        actorder = getattr(modifier, "actorder", None)
        same("llm-compressor", {"dampening_frac": getattr(modifier, "dampening_frac", None),
                                "block_size": getattr(modifier, "block_size", None),
                                "actorder": None if actorder is None else str(getattr(actorder, "value", actorder))},
             {"dampening_frac": gptq["damp"], "block_size": gptq["block"],
              "actorder": "weight" if gptq["act_order"] else None})
    return f"llm-compressor recipe: {type(modifier).__name__} with {len(modifier.config_groups)} config groups"


def build(model_dir: str, exported: str, out: Path, calibration: str | None) -> str:
    """llm-compressor's `oneshot` with the exported recipe on the calibration sequences (float32), saved as a
    compressed-tensors checkpoint with the scales in the recipe's float16 (llm-compressor keeps them in the model's
    dtype), loaded back by transformers (which decompresses it); bytes are the checkpoint's tensors per layer."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from llmcompressor.modeling.moe.linearize import get_linearized_moes, linearize_moe

    ids = load_file(calibration)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linearize_moe(model)  # a dense model is left as it is
    checkpoint = out / "checkpoint"
    oneshot(model=model, dataset=data, recipe=exported, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    for module in model.modules():  # scales are kept in the model's dtype: stored as the recipe's float16
        scale = getattr(module, "weight_scale", None)
        if isinstance(scale, torch.nn.Parameter):
            scale.data = scale.data.to(torch.float16)
    model.save_pretrained(str(checkpoint), save_compressed=True)
    if get_linearized_moes(model):
        weights, stored = _experts_read_back(model, checkpoint)
        save_weights(out, weights, stored)
        return (f"llm-compressor quantized {len(stored)} layers ({sum('experts.' in n for n in stored)} expert units);"
                f" compressed-tensors checkpoint decompressed by compressed-tensors")
    stored = stored_bytes(checkpoint, lambda part: part.startswith("weight_"))  # compressed-tensors' weight_packed, ...
    loaded = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    modules = dict(loaded.named_modules())
    weights = {name: modules[name].weight.detach() for name in stored}
    save_weights(out, weights, stored)
    return f"llm-compressor quantized {len(stored)} layers; compressed-tensors checkpoint loaded back by transformers"


def load(artifact: str, out: Path) -> str:
    """A compressed-tensors folder as transformers loads it (compressed-tensors decompresses each layer); bytes are
    its files' tensors per layer. Experts saved one by one (`experts.N.w1`, as vLLM reads them) transformers does
    not load into its fused experts: each saved layer is then decompressed by compressed-tensors' own compressor
    with the scheme of the config group that targets its saved name."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    saved = _saved_layers(Path(artifact))
    if any(_EXPERT.match(name) for name in saved):
        weights, stored = _saved_read_back(Path(artifact), saved)
        save_weights(out, weights, stored)
        return f"compressed-tensors decompressed {len(stored)} saved layers (experts one by one)"
    stored = stored_bytes(Path(artifact), lambda part: part.startswith("weight_"))
    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    modules = dict(model.named_modules())
    save_weights(out, {name: modules[name].weight.detach() for name in stored}, stored)
    return f"transformers loaded {len(stored)} compressed-tensors layers"


_EXPERT = re.compile(r"^(?P<unit>.*\.experts)\.(?P<index>\d+)\.(?P<projection>[^.]+)$")


def _file_key(name: str) -> tuple[str, str]:
    """A module's name as the checkpoint and the model both give it: the component after a block's index is dropped
    (llm-compressor saves Mixtral's `mlp.experts` under the checkpoint's `block_sparse_moe.experts`)."""
    m = re.match(r"^(?P<head>.*?\.layers\.\d+)\.[^.]+\.(?P<tail>.+)$", name)
    return (m["head"], m["tail"]) if m else (name, "")


def _experts_read_back(model, checkpoint: Path) -> tuple[dict, dict]:
    """Each quantized module's weight as compressed-tensors decompresses the checkpoint's tensors (with the module's
    scheme), experts stacked into their units' [experts, out, in]; bytes are the checkpoint's tensors per unit."""
    import torch
    from compressed_tensors.compressors.base import BaseCompressor
    from safetensors import safe_open

    parts: dict[tuple[str, str], dict] = {}
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                layer, _, part = key.rpartition(".")
                if part.startswith("weight_"):
                    parts.setdefault(_file_key(layer), {})[part] = fh.get_tensor(key)
    weights, stored, experts = {}, {}, {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        state = parts[_file_key(name)]
        fmt = scheme.format.value if scheme.format else "pack-quantized"
        weight = BaseCompressor.get_value_from_registry(fmt).decompress(state, scheme)["weight"].float()
        size = sum(t.numel() * t.element_size() for t in state.values())
        m = _EXPERT.match(name)
        if m:
            unit = f"{m['unit']}.{m['projection']}"
            experts.setdefault(unit, {})[int(m["index"])] = weight
            stored[unit] = stored.get(unit, 0) + size
        else:
            weights[name], stored[name] = weight, size
    for unit, by_index in experts.items():
        weights[unit] = torch.stack([by_index[e] for e in sorted(by_index)])
    return weights, stored


def _saved_layers(folder: Path) -> dict[str, dict]:
    """The safetensors files' quantized tensors by saved layer name (`weight_packed`, `weight_scale`, ...)."""
    from safetensors import safe_open

    parts: dict[str, dict] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                layer, _, part = key.rpartition(".")
                if part.startswith("weight_"):
                    parts.setdefault(layer, {})[part] = fh.get_tensor(key)
    return parts


def _saved_read_back(folder: Path, saved: dict[str, dict]) -> tuple[dict, dict]:
    """Each saved layer's weight as compressed-tensors decompresses it, by saved name, with the scheme of the one
    config group whose targets match that name; bytes are its tensors'."""
    import json

    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils import match_name

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    weights, stored = {}, {}
    for name, state in saved.items():
        groups = [g for g in config["config_groups"].values() if any(match_name(name, t) for t in g["targets"])]
        if len(groups) != 1:
            raise ValueError(f"{name} is targeted by {len(groups)} config groups, not one")
        scheme = QuantizationScheme(targets=groups[0]["targets"], weights=groups[0]["weights"])
        weights[name] = compressor.decompress(state, scheme)["weight"].float()
        stored[name] = sum(t.numel() * t.element_size() for t in state.values())
    return weights, stored
