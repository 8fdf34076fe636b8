"""A transformers checkpoint folder written from the job's level store, for the runtimes that load one (llm-compressor's
compressed-tensors, GPTQModel's GPTQ): each searched layer's `weight` replaced by the runtime's tensors of its level
(the codes, scales and zero points bitalloc measured, repacked only where the runtime lays bits out otherwise),
every other tensor as the front counted it (a 16-bit layer in its format's dtype, the rest at the loaded dtype, a tied
head once), the model's config with the runtime's `quantization_config`, its tokenizer, and the model card."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from bitalloc.errors import BitallocError
from bitalloc.kernels.packed import PackedWeight
from bitalloc.kernels.rtn import TORCH_DTYPES

WEIGHTS_FILE = "model.safetensors"

LayerTensors = Callable[[PackedWeight], dict[str, torch.Tensor]]  # a level -> the runtime's tensors (LAYER.<key>)


def check_storable(runtime, doc) -> None:
    """Every quantized layer's level is one the runtime's artifact stores as measured: made by one of its quantizers
    (so in its grid and layout), in a format it places exactly, that `runtime.unstorable` has no reason against;
    else one line naming the layer and the runtime's nearest."""
    from .base import _show, layers_of

    layers = layers_of(doc)
    experts = [l.name for l in layers if l.experts]
    if experts:
        raise BitallocError("--runtime", f"{runtime.name}'s artifact for mixture-of-experts units ({len(experts)}, "
                                         f"e.g. {experts[0]}) is not written yet; export the recipe (bitalloc export "
                                         f"--format {runtime.name}) for {runtime.name} to quantize the model")
    placed = runtime.place([l for l in layers if not l.embedding], doc.model.type)
    for l in layers:
        why = _unstored(runtime, l, placed.get(l.name))
        if why:
            near = _show(placed[l.name].value) if l.name in placed else "16-bit"
            raise BitallocError("--runtime", f"{l.name} is at {l.fmt.name}, which {runtime.name} does not store as "
                                             f"bitalloc measured it ({why}; its nearest: {near}); build a point of a "
                                             f"job searched with formats.target: {runtime.name}")


def _unstored(runtime, layer, placement) -> str:
    """Why the runtime's artifact cannot hold this layer's level as measured ("": it can)."""
    f = layer.fmt
    if not f.quantized:
        return ""
    if layer.embedding:
        return "the token embedding stays unquantized there"
    if f.method not in runtime.methods:
        return f"its levels were made by {f.method}, not {' or '.join(runtime.methods)}"
    if not placement.exact:
        return placement.why
    return runtime.unstorable(f)


def write_checkpoint(ws, doc, out: Path, layer_tensors: LayerTensors, quantization_config: dict,
                     readme: str, extra: dict[str, str] | None = None) -> dict:
    """Write the folder into `out`; returns its figures (levels written, stored bytes of the quantized layers)."""
    from safetensors.torch import save_file

    formats = doc.formats()
    module = ws.model.module
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    levels, stored = 0, 0
    for key, t in module.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen and t.numel():  # a tied head: stored once, as transformers saves it
            continue
        seen.add(t.data_ptr())
        layer, _, part = key.rpartition(".")
        fmt = formats.get(layer)
        if fmt is None or part != "weight":
            tensors[key] = t
        elif not fmt.quantized:
            tensors[key] = t.to(TORCH_DTYPES[fmt.scale_dtype])
        else:
            own = layer_tensors(ws.levels.read(layer, fmt))
            tensors.update({f"{layer}.{k}": v for k, v in own.items()})
            levels += 1
            stored += sum(v.numel() * v.element_size() for v in own.values())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = copy.deepcopy(module.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF source's note: this folder is not that file
    config.quantization_config = quantization_config
    config.save_pretrained(out)
    if ws.model.tokenizer is not None:
        ws.model.tokenizer.save_pretrained(out)
    for name, text in (extra or {}).items():
        (out / name).write_text(text)
    (out / "README.md").write_text(readme)
    return {"levels": levels, "stored_layer_bytes": stored}
