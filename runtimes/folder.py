"""A transformers checkpoint folder written from the job's level store, for the runtimes that load one (llm-compressor's
compressed-tensors, GPTQModel's GPTQ): each searched layer's `weight` replaced by the runtime's tensors of its level
(the codes, scales and zero points bitalloc measured, repacked only where the runtime lays bits out otherwise),
every other tensor as the front counted it (a 16-bit layer in its format's dtype, the rest at the loaded dtype, a tied
head once), the model's config with the runtime's `quantization_config`, its tokenizer, and the model card."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bitalloc.errors import BitallocError
from bitalloc.kernels.packed import PackedWeight
from bitalloc.kernels.rtn import TORCH_DTYPES
from bitalloc.types import FileBytes

WEIGHTS_FILE = "model.safetensors"

LayerTensors = Callable[[PackedWeight], dict[str, torch.Tensor]]  # a level -> the runtime's tensors (LAYER.<key>)


def check_storable(runtime, doc) -> None:
    """Every quantized layer's level is one the runtime's artifact stores as measured: made by one of its quantizers
    (so in its grid and layout), in a format it places exactly, that `runtime.unstorable` has no reason against;
    else one line naming the layer and the runtime's nearest."""
    from .base import _show, layers_of

    layers = layers_of(doc)
    runtime.check_experts(layers, "--runtime")
    placed = runtime.place([l for l in layers if not l.embedding], doc.model.type)
    for l in layers:
        why = runtime.unstored(l, placed.get(l.name))
        if why:
            near = _show(placed[l.name].value) if l.name in placed else "16-bit"
            raise BitallocError("--runtime", f"{l.name} is at {l.fmt.name}, which {runtime.name} does not store as "
                                             f"bitalloc measured it ({why}; its nearest: {near}); build a point of a "
                                             f"job searched with formats.target: {runtime.name}, or pass --nearest")


def unstored(runtime, layer, placement) -> str:
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


@dataclass(frozen=True)
class Checkpoint:
    """What a runtime's folder holds beside the model's own tensors and tokenizer: each quantized layer's tensors,
    the config's `quantization_config`, and further files (name -> text)."""

    layer_tensors: LayerTensors
    quantization_config: dict
    extra: dict[str, str] = field(default_factory=dict)


def _tensors(names: "CheckpointNames", formats: dict, layer_tensors: LayerTensors,
             level) -> tuple[dict[str, torch.Tensor], int, int]:
    """The weights file's tensors under the names transformers saves them by (`CheckpointNames`; each searched
    layer's, and each expert's of an expert unit, from `level(name, fmt)`), the levels written, and the quantized
    layers' stored bytes."""
    tensors: dict[str, torch.Tensor] = {}
    levels, stored = 0, 0

    def put(prefix: str, fmt, level_of, weight) -> None:
        nonlocal levels, stored
        if not fmt.quantized:
            tensors[f"{prefix}.weight"] = weight().to(TORCH_DTYPES[fmt.scale_dtype])
            return
        own = layer_tensors(level_of())
        tensors.update({f"{prefix}.{k}": v for k, v in own.items()})
        levels += 1
        stored += sum(v.numel() * v.element_size() for v in own.values())

    for key, t in names.plain.items():
        layer, _, part = names.source[key].rpartition(".")
        fmt = formats.get(layer)
        if fmt is None or part != "weight":
            tensors[key] = t
        else:
            put(key.rpartition(".")[0], fmt, lambda: level(layer, fmt), lambda: t)
    for key, (unit, e) in names.experts.items():
        fmt, l = formats[unit.name], unit
        put(key.rpartition(".")[0], fmt, lambda: expert_rows(level(l.name, fmt), e, l.out_features),
            lambda: names.expert_weight(unit, e))
    return tensors, levels, stored


def expert_rows(level: PackedWeight, e: int, rows: int) -> PackedWeight:
    """Expert `e`'s matrix of an expert unit's level (which stacks its experts' rows, expert after expert)."""
    part = slice(e * rows, (e + 1) * rows)
    return PackedWeight(level.qweight[part], level.scales[part], None if level.zeros is None else level.zeros[part],
                        level.fmt, level.in_features)


class CheckpointNames:
    """The model's tensors as transformers' `save_pretrained` names them — its own reverse weight conversion (e.g.
    Mixtral's `mlp.experts.gate_up_proj` saved as `block_sparse_moe.experts.N.w1` and `.w3`) —, which is what its
    loader and vLLM's read; `defused`: as the loaded model names them, each fused expert module's experts split into
    `experts.N.gate_proj` / `up_proj` / `down_proj` Linear modules (what GPTQModel's loader builds with `defuser`
    and saves). `plain`: saved name -> tensor, a tied head once; `source`: saved name -> the model's state-dict name;
    `experts`: saved name of each expert's weight of an expert unit -> (unit, expert)."""

    def __init__(self, module, layers, defused: bool = False):
        from transformers import PreTrainedModel

        self.module = module
        state = module.state_dict(keep_vars=False)
        fused: dict[tuple[str, str], list] = {}
        for l in layers:
            if l.experts:
                fused.setdefault((l.module_name, l.param), []).append(l)
        seen, plain = set(), {}
        for key, t in state.items():
            if t.data_ptr() in seen and t.numel():  # a tied head: stored once, as transformers saves it
                continue
            seen.add(t.data_ptr())
            plain[key] = t
        self.experts: dict[str, tuple] = {}
        for (owner, param), units in fused.items():
            del plain[f"{owner}.{param}"]
            if defused:
                self._defuse(f"{owner}.{param}", units)
            else:
                self._split(f"{owner}.{param}", state[f"{owner}.{param}"], units)
        revert = (lambda d: d) if defused or not isinstance(module, PreTrainedModel) else self._revert
        ids = {id(t): key for key, t in plain.items()}
        self.plain = revert(plain)
        self.source = {}
        for key, t in self.plain.items():
            if id(t) not in ids:
                raise BitallocError("--runtime", f"transformers saves {key} converted from the loaded tensors; "
                                                 f"bitalloc writes only renamed ones")
            self.source[key] = ids[id(t)]

    def _revert(self, state: dict) -> dict:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.module, state)

    def _split(self, key: str, fused: torch.Tensor, units: list) -> None:
        """Each expert's weight of the units held by one fused parameter, found by saving a stand-in whose every
        row holds its own (expert, row) index."""
        from transformers import PreTrainedModel

        experts, rows = fused.shape[0], fused.shape[1]
        if units[0].transposed or not isinstance(self.module, PreTrainedModel):
            raise BitallocError("--runtime", f"{key}: experts stored transposed or fused on disk have no per-expert "
                                             f"checkpoint form here; build the llama.cpp GGUF")
        index = torch.arange(experts * rows, dtype=torch.int64).reshape(experts, rows, 1)  # one column is enough
        for name, t in self._revert({key: index}).items():
            if t.dim() != 2:
                raise BitallocError("--runtime", f"{key}: transformers saves these experts fused ({name}); there is "
                                                 f"no per-expert checkpoint form; build the llama.cpp GGUF")
            e, got = int(t[0, 0]) // rows, (t[:, 0] % rows).tolist()
            unit = next((u for u in units if got == _unit_rows(u, rows)), None)
            if unit is None:
                raise BitallocError("--runtime", f"{key}: transformers saves {name} from rows no unit holds")
            self.experts[name] = (unit, e)

    def _defuse(self, key: str, units: list) -> None:
        """Each expert's weight of the units held by one fused parameter, as the defused module names it."""
        if units[0].transposed:
            raise BitallocError("--runtime", f"{key}: experts stored transposed (with biases) have no defused "
                                             f"checkpoint form here; build the llama.cpp GGUF")
        for unit in units:
            self.experts.update({f"{unit.module_name}.{e}.{unit.projection}.weight": (unit, e)
                                 for e in range(unit.experts)})

    def saved(self, layer) -> list[str]:
        """The names a layer's weights are saved under, without `.weight` (an expert unit's: one per expert)."""
        if layer.experts:
            return [k.rpartition(".")[0] for k, (u, _) in sorted(self.experts.items(), key=lambda kv: kv[1][1])
                    if u.name == layer.name]
        return [k.rpartition(".")[0] for k, source in self.source.items() if source == f"{layer.name}.weight"]

    def as_units(self, weights: dict, stored: dict) -> tuple[dict, dict]:
        """A runtime's weights and stored bytes read back by saved name, as the job's units: each expert unit's
        experts stacked into its [experts, out, in], its bytes their sum."""
        plain = {k.rpartition(".")[0]: v.rpartition(".")[0] for k, v in self.source.items()}
        experts = {k.rpartition(".")[0]: v for k, v in self.experts.items()}
        units, nbytes, stacks = {}, {}, {}
        for name, w in weights.items():
            if name in experts:
                unit, e = experts[name]
                stacks.setdefault(unit.name, {})[e] = w
                nbytes[unit.name] = nbytes.get(unit.name, 0) + stored[name]
            else:
                units[plain.get(name, name)], nbytes[plain.get(name, name)] = w, stored[name]
        units.update({u: torch.stack([by[e] for e in sorted(by)]) for u, by in stacks.items()})
        return units, nbytes

    def expert_weight(self, unit, e: int) -> torch.Tensor:
        """Expert `e`'s float [out, in] matrix of an expert unit (a 16-bit unit's)."""
        t = self.module.get_parameter(f"{unit.module_name}.{unit.param}")[e]
        if unit.rows:
            start, step = unit.rows
            t = t[start::step][: unit.out_features]
        return t.detach()


def _unit_rows(unit, rows: int) -> list[int]:
    start, step = unit.rows or (0, 1)
    return list(range(start, rows, step))[: unit.out_features]


def _config(ws, quantization_config: dict):
    config = copy.deepcopy(ws.model.module.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF source's note: this folder is not that file
    config.quantization_config = quantization_config
    return config


def write_checkpoint(ws, formats: dict, out: Path, parts: Checkpoint, names: "CheckpointNames",
                     readme: str) -> dict:
    """Write the folder into `out`; returns its figures (levels written, stored bytes of the quantized layers)."""
    from safetensors.torch import save_file

    tensors, levels, stored = _tensors(names, formats, parts.layer_tensors, ws.levels.read)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata=METADATA)
    _config(ws, parts.quantization_config).save_pretrained(out)
    if ws.model.tokenizer is not None:
        ws.model.tokenizer.save_pretrained(out)
    for name, text in parts.extra.items():
        (out / name).write_text(text)
    (out / "README.md").write_text(readme)
    return {"levels": levels, "stored_layer_bytes": stored}


def folder_bytes(runtime, ws) -> FileBytes | None:
    """How the runtime's folder stores a point of the job `ws` opened, model card aside (`point_bytes` of the point
    with every layer at the job's first format it takes, less those layers' tensors), each layer then adding its
    tensors' bytes. The headers and JSON that name a point's formats (tensor shapes and offsets, the quantization
    config's groups) differ from point to point by a few hundred bytes: `verify` reports the written folder's
    difference. None where the runtime's folder holds no such expert units (`check_storable`; experts stored
    transposed, as gpt-oss's, are saved fused): bitalloc's count."""
    if any(l.experts and (l.transposed or not runtime.experts) for l in ws.layers):
        return None
    return reference_bytes(runtime.name, ws, lambda formats: point_bytes(runtime, ws, formats))


def reference_bytes(runtime: str, ws, point_bytes: Callable[[dict], tuple[int, int]]) -> FileBytes:
    """A folder's bytes whatever the point: `point_bytes` (folder bytes, its quantized layers' bytes) of the point
    with every layer at the job's first format it takes, less those layers' tensors."""
    formats = {l.name: next(f for f in ws.formats if f.quantized and f.fits(l.in_features)) for l in ws.layers}
    total, stored = point_bytes(formats)
    return FileBytes(runtime, total - stored, kind="folder")


def point_bytes(runtime, ws, formats: dict) -> tuple[int, int]:
    """(the folder's bytes, model card aside; its quantized layers' tensor bytes) for the layers at `formats`,
    computed without writing it or reading a level."""
    from .base import Layer

    layers = [Layer(l.name, formats[l.name], l.out_features, l.in_features, l.experts, l.embedding)
              for l in ws.layers]
    quantizers = {m: s.quantizer.params() for m, s in ws.levels.stores.items()}
    names = runtime.names(ws.model.module, ws.layers)
    parts = runtime.checkpoint(layers, ws.model.model_type, quantizers, names)
    shapes = {l.name: l for l in ws.layers}
    tensors, _, stored = _tensors(names, formats, parts.layer_tensors,
                                  lambda name, fmt: PackedWeight.empty(fmt, shapes[name].row_count,
                                                                       shapes[name].in_features))
    text = _config(ws, parts.quantization_config).to_json_string(use_diff=True)
    total = (safetensors_bytes(tensors, METADATA) + len(text.encode()) + tokenizer_bytes(ws)
             + sum(len(t.encode()) for t in parts.extra.values()))
    return total, stored


def tokenizer_bytes(ws) -> int:
    """The bytes of the files the model's tokenizer saves."""
    import tempfile

    if ws.model.tokenizer is None:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ws.model.tokenizer.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


METADATA = {"format": "pt"}
# safetensors writes tensors by dtype, widest first (its dtype enum in reverse), then by name
_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
           torch.int64: "I64"}
_ORDER = list(_DTYPES.values())


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None) -> int:
    """The size of the safetensors file `save_file(tensors, metadata=metadata)` writes: its 8-byte length, its JSON
    header (tensors in the library's order, padded with spaces to 8 bytes) and the tensors' bytes."""
    order = sorted(tensors, key=lambda k: (-_ORDER.index(_DTYPES[tensors[k].dtype]), k))
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset
