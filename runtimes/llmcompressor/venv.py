"""llm-compressor's side in the runtimes' environment (see runtimes/venv.py): its `Recipe` reads the exported recipe;
its `oneshot` builds the point, saved as compressed-tensors and loaded back by transformers."""

from __future__ import annotations

from pathlib import Path

from bitalloc_venv import gptq_of, quantized_layers, same, save_weights, stored_bytes

LIBRARY = "llmcompressor"


def check(path: str, config: dict | None) -> str:
    from compressed_tensors.utils import match_name
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(path)
    modifier = recipe.modifiers[0]
    for name, f in quantized_layers(config).items():
        hits = [g for g in modifier.config_groups.values() if any(match_name(name, t) for t in g.targets)]
        if len(hits) != 1 or (hits[0].weights.num_bits, hits[0].weights.group_size) != (f["bits"], f["group_size"]):
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
    stored = stored_bytes(checkpoint, lambda part: part.startswith("weight_"))  # compressed-tensors' weight_packed, ...
    loaded = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    modules = dict(loaded.named_modules())
    weights = {name: modules[name].weight.detach() for name in stored}
    save_weights(out, weights, stored)
    return f"llm-compressor quantized {len(stored)} layers; compressed-tensors checkpoint loaded back by transformers"
