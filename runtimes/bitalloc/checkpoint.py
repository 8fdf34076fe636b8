"""Packed checkpoints: a model with its chosen layers as `QuantLinear`s (a quantized token embedding as a
`QuantEmbedding`, a head tied to it sharing its buffers; a mixture-of-experts block's projections as a
`QuantExperts`), saved as safetensors.

A checkpoint folder holds `model.safetensors` (packed words, scales, zero points, and every other
tensor as it was), the transformers config and tokenizer, and `bitalloc_config.json` (the canonical
config it was packed from). `load_packed(DIR)` rebuilds the model from those alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.model import LoadedModel, list_layers, load_model
from bitalloc.results import ConfigDoc, read_config

from bitalloc.kernels.packed import PackedWeight
from bitalloc.kernels.quant_embedding import QuantEmbedding
from bitalloc.kernels.quant_experts import QuantExperts
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.kernels.rtn import fake_quantize
from bitalloc.paths import publish, staging_dir

CONFIG_FILE = "bitalloc_config.json"
WEIGHTS_FILE = "model.safetensors"


def job_levels(config: ConfigDoc, model: LoadedModel, data_hash: str | None) -> Callable[[str, Format], PackedWeight]:
    """Each layer's level as the job measured it: read from this machine's level store (the config's quantizers with
    their parameters, keyed by the job's data hash where they read calibration data). A level the store lost is made
    again where its quantizer reads no data; one that needs the job's calibration data is refused in one line."""
    import torch

    from bitalloc.quantizers import Calibration, get_quantizer
    from bitalloc.quantizers.store import LevelStore

    layers = {l.name: l for l in list_layers(model)}
    stores = {m: LevelStore(config.model.content_hash, get_quantizer(m, **config.quantizers.get(m, {})),
                            calibration=Calibration(torch.empty(0, dtype=torch.long), data_hash or ""))
              for m in {f.method for f in config.formats().values() if f.quantized}}

    def read(name: str, fmt: Format) -> PackedWeight:
        store = stores[fmt.method]
        if store.has(name, fmt):
            return store.read(name, fmt)
        if store.quantizer.reads_calibration():
            raise BitallocError("TARGET", f"the level of {name} at {fmt.name} ({fmt.method}, made from the job's "
                                          f"calibration data) is not in this machine's level store {store.folder}; "
                                          f"run the job here first")
        return store.quantizer.quantize(model.weight(layers[name]), fmt)

    return read


def quantize_model(model: LoadedModel, assignment: dict[str, Format],
                   level: Callable[[str, Format], PackedWeight]) -> int:
    """Swap each quantized layer for its packed module over its level (`_swap_in`); 16-bit layers are rounded to
    their 16-bit dtype, as the evaluator does. Returns the packed bytes of the quantized layers."""
    layers = {l.name: l for l in list_layers(model)}
    packed = {}
    for name, fmt in assignment.items():
        if fmt.quantized:
            packed[name] = level(name, fmt)
        else:
            layer = layers[name]
            model.put(layer, model.stored(layer, fake_quantize(model.weight(layer), fmt)))
    _swap_in(model, layers, packed)
    return sum(p.nbytes for p in packed.values())


def _empty_quant_layers(model: LoadedModel, assignment: dict[str, Format]) -> None:
    """The packed modules of the quantized layers, their buffers to be loaded from the checkpoint."""
    layers = {l.name: l for l in list_layers(model)}
    _swap_in(model, layers, {name: PackedWeight.empty(fmt, layers[name].row_count, layers[name].in_features,
                                                      device="cpu")
                             for name, fmt in assignment.items() if fmt.quantized})


def _swap_in(model: LoadedModel, layers: dict, packed: dict[str, PackedWeight]) -> None:
    """Replace each layer by a QuantLinear over its level, a token embedding by a QuantEmbedding (a head tied to it
    a QuantLinear over the same buffers), an experts module with a quantized unit by a `QuantExperts` (its other
    projections float, as they are)."""
    blocks: dict[str, dict] = {}
    for name, level in packed.items():
        spec = layers[name]
        if spec.experts:
            blocks.setdefault(spec.module, {})[spec.projection] = level
        elif spec.embedding:
            QuantEmbedding.swap_in(model.module, name, level)
            if spec.head:
                model.module.get_submodule(name).tie_head(model.module, spec.head)
        else:
            QuantLinear.swap_in(model.module, name, level)
    for module, levels in blocks.items():
        units = [l for l in layers.values() if l.experts and l.module == module]
        floats = {u.projection: model.weight(u).detach().clone() for u in units if u.projection not in levels}
        QuantExperts.swap_in(model.module, module, {**floats, **levels})


def check_output(out: Path, field: str) -> None:
    """Refuse, before any work, an output that is neither empty nor an earlier packed checkpoint, or that cannot
    be created."""
    if out.exists() and not (out.is_dir() and ((out / CONFIG_FILE).is_file() or not any(out.iterdir()))):
        raise BitallocError(field, f"{str(out)!r} exists and is not a packed checkpoint")
    configio.check_writable(out, field)


def check_packable(config: ConfigDoc) -> None:
    """Refuse a config the packed checkpoint has no form for: llama.cpp's types."""
    ggml = [(n, f) for n, f in config.formats().items() if f.ggml]
    if ggml:
        raise BitallocError("TARGET", f"{ggml[0][0]} is at llama.cpp's {ggml[0][1].ggml}, which bitalloc's kernels do "
                                      f"not run; build it with --runtime llamacpp")


def pack(config: ConfigDoc, out: Path, data_hash: str | None = None) -> int:
    """The config's model with every layer at its level as the job measured it (`job_levels`; `data_hash` is the
    job's token sets), saved packed into OUT; returns the packed layers' bytes. The model is the one the config
    names, refused if its content differs from the one searched (and never loaded with its own code: a config file
    names the model, it does not vouch for it)."""
    check_packable(config)
    model = load_model(config.model.source)
    if model.content_hash() != config.model.content_hash:
        raise BitallocError("TARGET", f"the model at {config.model.source!r} is not the one searched (content hash "
                                      f"differs); rerun the job")
    packed = quantize_model(model, config.formats(), job_levels(config, model, data_hash))
    save_packed(model, config, out)
    return packed


def save_packed(model: LoadedModel, config: ConfigDoc, out: Path) -> None:
    """Write the (already quantized) model into OUT, atomically: a staging folder renamed when complete."""
    from safetensors.torch import save_model

    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model.module, str(staging / WEIGHTS_FILE))
    model.module.config.save_pretrained(staging)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(staging)
    configio.write(config.document(), staging / CONFIG_FILE)
    publish(staging, out)


def load_packed(path: str | Path) -> LoadedModel:
    """The model of a packed checkpoint, its chosen layers as QuantLinears, ready for inference."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise BitallocError("DIR", f"{str(path)!r} is not a packed checkpoint (no {CONFIG_FILE} / {WEIGHTS_FILE})")
    doc = read_config(path / CONFIG_FILE)
    config = AutoConfig.from_pretrained(path)
    with safe_open(str(path / WEIGHTS_FILE), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    dtype = torch.float32 if "F32" in dtypes else torch.float16 if "F16" in dtypes else torch.bfloat16
    module = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    model = LoadedModel(module, tokenizer, str(path))
    _empty_quant_layers(model, doc.formats())
    missing, unexpected = load_model(module, str(path / WEIGHTS_FILE), strict=False)
    tied = {k for k in missing if k.endswith("weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise BitallocError("DIR", f"{WEIGHTS_FILE} does not match its config: missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]}")
    if not any(isinstance(m, QuantEmbedding) for m in module.modules()):
        module.tie_weights()  # a quantized embedding's head holds its buffers already (`QuantEmbedding.tie_head`)
    module.eval()
    return model
