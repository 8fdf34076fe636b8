"""The size of the packed checkpoint folder `bitalloc build` (or `pack`) writes for a point, computed without writing
it or reading a level: `model.safetensors` as `save_model` writes it (a tied head dropped under safetensors' own
rule and named in the file's metadata; each quantized layer's `qweight`, `scales`, `zeros` as a `QuantLinear` holds
them, a quantized token embedding's as its `QuantEmbedding` does, a mixture-of-experts block's projections as its
`QuantExperts` does; every other tensor at the loaded dtype), the
model's `config.json`, the tokenizer's files and `bitalloc_config.json`, the point's config document."""

from __future__ import annotations

import torch

from bitalloc import configio
from bitalloc.kernels.packed import PackedWeight
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.types import BitConfig, FileBytes, Measurement

from ..folder import reference_bytes, safetensors_bytes, tokenizer_bytes

# stand-ins for what a config document records once measured, as wide as such figures print
_FIGURE, _SPEC_HASH = 0.12345678901234568, "sha256:" + "0" * 64


def _weights(module: torch.nn.Module, formats: dict, layers: list) -> tuple[dict[str, torch.Tensor], dict | None, int]:
    """The weights file's tensors, its metadata and the quantized layers' stored bytes."""
    from safetensors.torch import _remove_duplicate_names

    state = module.state_dict()
    shared = {gone: kept for kept, gone_ in _remove_duplicate_names(state).items() for gone in gone_}
    blocks = _expert_blocks(layers, formats, state)

    def saved(key: str) -> dict[str, torch.Tensor]:
        """What a state-dict entry is saved as: a quantized layer's weight its packed buffers, a packed experts
        module's fused parameter its projections' entries, by name."""
        layer, _, part = key.rpartition(".")
        if part in blocks.get(layer, {}):
            return blocks[layer][part]
        fmt, t = formats.get(layer), state[key]
        if fmt is None or not fmt.quantized or part != "weight":
            return {key: t}
        own = QuantLinear(t.shape[1], t.shape[0], fmt, False, t.dtype, device="meta").state_dict()
        return {f"{layer}.{k}": v for k, v in own.items()}

    def packed(name: str) -> bool:
        owner, _, part = name.rpartition(".")
        return part in ("qweight", "scales", "zeros") and owner in formats and formats[owner].quantized

    tensors, metadata = {}, {}
    for key in state:
        if key in shared:  # a tied head: one tensor saved, its other names in the metadata
            metadata.update(zip(saved(key), saved(shared[key])))
            continue
        tensors.update(saved(key))
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if packed(k))
    return tensors, metadata or None, stored


def _expert_blocks(layers: list, formats: dict, state: dict) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per experts module with a quantized unit, per fused parameter, the `QuantExperts` entries saved for it: a
    quantized projection's packed buffers, another (unsearched, or at 16 bits) its float [experts, out, in].
    `layers`: every unit of the model, searched or not."""
    units: dict[str, list] = {}
    for l in layers:
        if l.experts:
            units.setdefault(l.module, []).append(l)
    blocks: dict[str, dict] = {}
    for module, ours in units.items():
        quantized = {u.name for u in ours if u.name in formats and formats[u.name].quantized}
        if not quantized:
            continue
        entries = blocks.setdefault(module, {})
        for u in ours:
            part = entries.setdefault(u.param, {})
            if u.name in quantized:
                level = PackedWeight.empty(formats[u.name], u.row_count, u.in_features)
                part.update({f"{u.name}.{k}": t for k, t in (("qweight", level.qweight), ("scales", level.scales),
                                                              ("zeros", level.zeros)) if t is not None})
            else:
                part[u.name] = torch.empty(u.shape, dtype=state[f"{module}.{u.param}"].dtype, device="meta")
    return blocks


def point_bytes(ws, formats: dict) -> tuple[int, int]:
    """(the packed folder of the point at `formats`, model card aside; its quantized layers' stored bytes). The
    config document's measured figures are stood in for by figures as wide as such print."""
    from bitalloc.model import list_layers
    from bitalloc.pipeline import config_meta
    from bitalloc.results import ConfigDoc

    heads = {l.head: formats[l.name] for l in ws.layers if l.embedding and l.head}  # a tied head: its table's
    tensors, metadata, stored = _weights(ws.model.module, {**formats, **heads}, list_layers(ws.model))
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


def folder_bytes(ws) -> FileBytes:
    """How the packed folder stores the job's points: the folder with every layer at the job's first format it
    takes, less those layers' tensors, each layer then adding its own (the `packed` layout's count)."""
    return reference_bytes("bitalloc", ws, lambda formats: point_bytes(ws, formats))
