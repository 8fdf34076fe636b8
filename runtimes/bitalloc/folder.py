"""The size of the packed checkpoint folder `bitalloc build` (or `pack`) writes for a point, computed without writing
it or reading a level: `model.safetensors` as `save_model` writes it (a tied head dropped under safetensors' own
rule and named in the file's metadata; each quantized layer's `qweight`, `scales`, `zeros` as a `QuantLinear` holds
them, a quantized token embedding's as its `QuantEmbedding` does; every other tensor at the loaded dtype), the
model's `config.json`, the tokenizer's files and `bitalloc_config.json`, the point's config document."""

from __future__ import annotations

import torch

from bitalloc import configio
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.types import BitConfig, FileBytes, Measurement

from ..folder import reference_bytes, safetensors_bytes, tokenizer_bytes

# stand-ins for what a config document records once measured, as wide as such figures print
_FIGURE, _SPEC_HASH = 0.12345678901234568, "sha256:" + "0" * 64


def _weights(module: torch.nn.Module, formats: dict) -> tuple[dict[str, torch.Tensor], dict | None, int]:
    """The weights file's tensors, its metadata and the quantized layers' stored bytes."""
    from safetensors.torch import _remove_duplicate_names

    state = module.state_dict()
    shared = {gone: kept for kept, gone_ in _remove_duplicate_names(state).items() for gone in gone_}

    def saved(key: str) -> dict[str, torch.Tensor]:
        """What a state-dict entry is saved as: a quantized layer's weight its packed buffers, by name."""
        layer, _, part = key.rpartition(".")
        fmt, t = formats.get(layer), state[key]
        if fmt is None or not fmt.quantized or part != "weight":
            return {key: t}
        own = QuantLinear(t.shape[1], t.shape[0], fmt, False, t.dtype, device="meta").state_dict()
        return {f"{layer}.{k}": v for k, v in own.items()}

    tensors, metadata, stored = {}, {}, 0
    for key in state:
        if key in shared:  # a tied head: one tensor saved, its other names in the metadata
            metadata.update(zip(saved(key), saved(shared[key])))
            continue
        own = saved(key)
        tensors.update(own)
        if key not in own:
            stored += sum(v.numel() * v.element_size() for v in own.values())
    return tensors, metadata or None, stored


def point_bytes(ws, formats: dict) -> tuple[int, int]:
    """(the packed folder of the point at `formats`, model card aside; its quantized layers' stored bytes). The
    config document's measured figures are stood in for by figures as wide as such print."""
    from bitalloc.pipeline import config_meta
    from bitalloc.results import ConfigDoc

    heads = {l.head: formats[l.name] for l in ws.layers if l.embedding and l.head}  # a tied head: its table's
    tensors, metadata, stored = _weights(ws.model.module, {**formats, **heads})
    weights = safetensors_bytes(tensors, metadata)
    names = [l.name for l in ws.layers]
    fmts = tuple(formats[n] for n in names)
    bits = 8.0 * stored / sum(l.numel for l in ws.layers)
    doc = ConfigDoc.of(BitConfig(tuple(names), fmts, weights, bits, _FIGURE),
                       Measurement(_FIGURE, 10 + _FIGURE, ws.data.evaluation.numel()),
                       **config_meta(ws, _SPEC_HASH, weights - stored))
    config = ws.model.module.config.to_json_string(use_diff=True)
    total = (weights + len(config.encode()) + tokenizer_bytes(ws)
             + len(configio.dumps(doc.document()).encode()))
    return total, stored


def folder_bytes(ws) -> FileBytes | None:
    """How the packed folder stores the job's points: the folder with every layer at the job's first format it
    takes, less those layers' tensors, each layer then adding its own (the `packed` layout's count). None for expert
    units, which the packed checkpoint does not hold (`check_packable`)."""
    if any(l.experts for l in ws.layers):
        return None
    return reference_bytes("bitalloc", ws, lambda formats: point_bytes(ws, formats))
