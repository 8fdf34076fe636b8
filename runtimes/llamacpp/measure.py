"""llama.cpp measures a config itself: the point's artifact (`build.py`: the GGUF written from the job's levels,
checked against the file `llama-quantize --tensor-type-file` writes from the exported types), or that file where
the levels are not llama.cpp's, run by `llama-perplexity --kl-divergence` on the job's held-out tokens.

llama-perplexity re-tokenizes text, so the job's tokens would not survive a round trip through it. Instead bitalloc
writes the base file `--kl-divergence` reads (the format `--kl-divergence-base` writes: the tokens, then for the
second half of each window the log-probabilities in 16 bits over the top 16 nats) from its float32 reference on the
held-out windows. llama.cpp then runs its model on exactly those tokens, scoring the same positions. Three runs:

- the float GGUF against that base: the two implementations' float arithmetic (`fp_gap_kl`, about 1e-4);
- the quantized GGUF against it: the runtime's KL and perplexity, what the user gets;
- for a front the torch evaluator measured, the quantized GGUF against bitalloc's own quantized log-probabilities
  (`vs_bitalloc_kl`): what llama.cpp's arithmetic adds to the same weights, mostly its 8-bit quantization of
  activations in quantized dot products. A front llama.cpp measured (`evaluations.evaluator: llamacpp`) is already
  that arithmetic on the same positions: its KL is the one set beside the runtime's.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.pipeline import Workspace
from bitalloc.types import FileBytes
from bitalloc.quantizers.gguf import tools
from bitalloc.quantizers.gguf.files import (float_gguf as model_gguf, imatrix, imatrix_file, keep_float,
                                            quantized_metadata, tensor_names)
from bitalloc.quantizers.gguf.index import read_tensors
from bitalloc.quantizers.gguf.writer import header_size

MAGIC = b"_logits_"


def windows(ws: Workspace, float_gguf: Path) -> torch.Tensor:
    """The held-out windows as llama.cpp will run them (`llama_windows`)."""
    return llama_windows(ws.model, ws.data.evaluation, float_gguf)


def llama_windows(model, tokens: torch.Tensor, float_gguf: Path) -> torch.Tensor:
    """Windows of `tokens` as llama.cpp runs them (its BOS in front where its tokenizer adds one), after checking that
    the GGUF's vocabulary spells every token of them as the loaded tokenizer does (a model without its tokenizer, as
    a Ray worker holds it, is not checked: its driver checked the same tokens)."""
    vocab, bos = _vocabulary(float_gguf)
    tokens = tokens.clone()
    ids = sorted(set(tokens.flatten().tolist())) if model.tokenizer is not None else []
    for tid, text in zip(ids, model.tokenizer.convert_ids_to_tokens(ids) if ids else []):
        if tid >= len(vocab) or vocab[tid] != text:
            theirs = vocab[tid] if tid < len(vocab) else "nothing"
            raise BitallocError("--runtime", f"tokenizer mismatch: token {tid} is {text!r} for bitalloc's tokenizer "
                                             f"and {theirs!r} in the GGUF; llama.cpp would run other text")
    if bos is not None:
        tokens[:, 0] = bos
    return tokens


@functools.lru_cache(maxsize=4)
def _vocabulary(float_gguf: Path) -> tuple[list[str], int | None]:
    """A GGUF's token strings and the BOS its tokenizer puts first (None: it adds none), read once per file (gguf-py
    parses every metadata entry: seconds for a large vocabulary)."""
    import gguf

    fields = gguf.GGUFReader(float_gguf).fields
    add_bos = "tokenizer.ggml.add_bos_token" in fields and bool(fields["tokenizer.ggml.add_bos_token"].contents())
    return fields["tokenizer.ggml.tokens"].contents(), int(fields["tokenizer.ggml.bos_token_id"].contents()) \
        if add_bos else None


def encode(lp: torch.Tensor, n_vocab: int) -> np.ndarray:
    """Rows of log-probabilities as llama-perplexity stores them: scale and minimum (two float32), then each entry
    above max − 16 as round((lp − min) / scale) in uint16, the row padded to an even count plus four."""
    lp = lp.float()
    top = lp.max(-1, keepdim=True).values
    low = torch.maximum(lp.min(-1, keepdim=True).values, top - 16)
    lse = torch.log(torch.exp(lp - top).double().sum(-1, keepdim=True)).float()
    scale = (top - low) / 65535.0
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.where(lp > low, torch.round(inv * (lp - low)), torch.zeros_like(lp)).to(torch.int32)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    out = np.zeros((lp.shape[0], nv), dtype=np.uint16)
    head = torch.cat([scale, low - top - lse], -1).numpy().astype(np.float32)
    out[:, :4] = head.view(np.uint16)
    out[:, 4:4 + n_vocab] = q.numpy().astype(np.uint16)
    return out


def write_base(path: Path, tokens: torch.Tensor, logprobs: Iterable[torch.Tensor], scored: bool = False) -> None:
    """A `--kl-divergence` base file: the windows' tokens and, per window, its scored positions' log-probabilities
    (positions n/2 … n−2, each predicting the next token), from each window's log-probabilities at every position
    or, with `scored`, at those positions only."""
    n_chunk, n_ctx = tokens.shape
    first = n_ctx // 2
    with open(path, "wb") as fh:
        fh.write(MAGIC)
        fh.write(np.array([n_ctx], dtype=np.uint32).tobytes())
        n_vocab = None
        for i, lp in enumerate(logprobs):
            if n_vocab is None:
                n_vocab = lp.shape[-1]
                fh.write(np.array([n_vocab, n_chunk], dtype=np.int32).tobytes())
                fh.write(tokens.to(torch.int32).numpy().tobytes())
            fh.write(encode(lp if scored else lp[first:n_ctx - 1], n_vocab).tobytes())


def same_positions(ref: Iterable[torch.Tensor], quant: Iterable[torch.Tensor], tokens: torch.Tensor,
                   scored: bool = False) -> tuple[float, float]:
    """KL(ref ‖ quant) and perplexity over the positions llama-perplexity scores, from each window's log-probabilities
    at every position or, with `scored`, at those positions only (per token first, then summed in float64)."""
    n_ctx = tokens.shape[1]
    first = n_ctx // 2
    kl, nll, n = 0.0, 0.0, 0
    for lp, lq, seq in zip(ref, quant, tokens):
        p, q = (lp.float(), lq.float()) if scored else (lp[first:n_ctx - 1].float(), lq[first:n_ctx - 1].float())
        kl += float((p.exp() * (p - q)).sum(-1).double().sum())
        nll += float(-q.gather(-1, seq[first + 1:].unsqueeze(-1)).double().sum())
        n += p.shape[0]
    return kl / n, float(np.exp(nll / n))


_KLD = re.compile(r"Mean\s+KLD:\s*([-\d.eE+]+)")
_PPL = re.compile(r"Mean PPL\(Q\)\s*:\s*([-\d.eE+]+)")


def perplexity(model: Path, base: Path, n_ctx: int) -> tuple[float, float]:
    """(mean KL, perplexity) as llama-perplexity --kl-divergence reports them against a base file."""
    out = tools.run("llama-perplexity", ["-m", str(model), "--kl-divergence-base", str(base), "--kl-divergence",
                                            "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(os.cpu_count() or 1)],
                       f"on {model.name}")
    kld, ppl = _KLD.search(out), _PPL.search(out)
    if not (kld and ppl):
        raise BitallocError("llama.cpp", f"llama-perplexity on {model.name} printed no KL divergence statistics")
    return float(kld[1]), float(ppl[1])


def same_blocks(tensor, level) -> bool:
    """Whether a GGUF tensor holds a gguf level's blocks byte for byte (rows compared as a multiset: llama.cpp's
    converter reorders the rows of some tensors, e.g. Llama's q/k heads)."""
    rows = np.asarray(tensor.data).reshape(level.out_features, -1)
    ours = level.blocks.cpu().numpy()
    return rows.shape == ours.shape and sorted(map(bytes, rows)) == sorted(map(bytes, ours))


def file_bytes(ws: Workspace) -> FileBytes:
    """How the GGUF file llama-quantize writes for a point of this job stores it: the metadata of the files it wrote
    from the level store's float file and the tensor index, every tensor no layer is at the float file's type, each
    tensor padded to the file's alignment (the size of an exported point's file, exactly)."""
    store = ws.levels.stores["gguf"]
    matrix = imatrix_file(store.folder) if store.quantizer.imatrix else None
    meta, alignment = quantized_metadata(ws.model, store.folder, matrix)
    floats = read_tensors(model_gguf(ws.model, store.folder))
    header = header_size(meta, [(t.name, len(t.shape)) for t in floats.values()], alignment)
    names = tensor_names(ws.model.model_type, [l.name for l in ws.layers])
    shared = len(names) - len(set(names.values()))
    missing = sorted(set(names.values()) - set(floats))
    if shared or missing:
        raise BitallocError("formats.target", f"llama.cpp's file does not hold the layers one tensor each "
                                              f"({missing[0] + ' is not in it' if missing else 'tensors shared'})")
    file, searched = FileBytes("llamacpp", header, alignment), set(names.values())
    return replace(file, fixed=header + sum(file.stored(t.n_bytes) for t in floats.values() if t.name not in searched))


def importance_matrix(ws: Workspace, quantizers: dict[str, dict]) -> Path | None:
    """The importance matrix the job's gguf levels were made with (`imatrix: true`): the level store's, made again
    from the job's calibration sequences if the store lost it; None for levels made without one."""
    store = ws.levels.stores.get("gguf")
    if store is None or not quantizers.get("gguf", {}).get("imatrix"):
        return None
    return imatrix(ws.model, ws.data.calibration, store.folder)


def float_gguf(ws: Workspace, cache: Path) -> Path:
    """The unquantized model as llama.cpp reads it: the gguf level store's copy, else one made for verification."""
    store = ws.levels.stores.get("gguf")
    return model_gguf(ws.model, store.folder if store is not None else cache / ws.model_hash)


def quantize(float_file: Path, out: Path, types_file: Path, ws: Workspace, searched: set[str],
             preset: str | None = None, matrix: Path | None = None) -> dict:
    """llama-quantize: the exported tensor types (every other matrix kept at the float file's type, as the front counts
    it), or one of llama.cpp's presets with its own mixture (the token embedding and output head its own unless the
    job kept them float), with the job's importance matrix if its levels were made
    with one; the tensors of the written file by GGUF name. `searched` are the GGUF names of the job's layers."""
    floats = read_tensors(float_file)
    args = keep_float(floats, searched) + (["--imatrix", str(matrix)] if matrix else [])
    if preset is None:
        others = [t for t in floats.values() if len(t.shape) >= 2 and t.name not in searched
                  and t.name not in ("token_embd.weight", "output.weight")]
        lines = types_file.read_text() + "".join(f"^{re.escape(t.name)}$={t.tensor_type.name.lower()}\n"
                                                 for t in others)
        full = types_file.with_suffix(".all.txt")
        full.write_text(lines)
        args = ["--pure", "--tensor-type-file", str(full)] + args
        ftype = "Q8_0"  # every matrix is named in the file; llama-quantize needs a quantized base type to honour it
    else:
        ftype = preset
    tools.run("llama-quantize", [*args, str(float_file), str(out), ftype, str(os.cpu_count() or 1)],
                 f"to {preset or 'the exported types'}")
    return read_tensors(out)


def artifact_of(ws: Workspace, doc) -> bool:
    """Whether `build` writes the point from the job's levels: every layer at a llama.cpp type the gguf store made,
    or at 16 bits (f16 or bf16 of the float tensor)."""
    return "gguf" in ws.levels.stores and all(f.ggml or not f.quantized for f in doc.formats().values())


def embedding_bytes(tensors: dict) -> int:
    """Bytes of a GGUF's token embedding and output head (one tensor when tied)."""
    return sum(int(tensors[n].n_bytes) for n in ("token_embd.weight", "output.weight") if n in tensors)


def verify(ws: Workspace, picked, text: str, work: Path, presets: bool, stages) -> list:
    """The point's artifact (`build`, from the job's llama.cpp levels; else llama-quantize's file of the exported
    types), measured by llama-perplexity on the job's held-out windows beside bitalloc's KL on the same positions,
    and compared with the file llama-quantize writes from the exported types (`recipe_tensors_matching`); with
    `presets`, llama.cpp's presets too (with the job's importance matrix where its levels were made with one). A
    float GGUF made for a verify that fails is not kept."""
    from bitalloc.paths import cache_dir

    with stages.stage("float GGUF"):
        cache = cache_dir("verify")
        existed = (cache / ws.model_hash).exists()
        float_file = float_gguf(ws, cache)
    try:
        return _measure(ws, picked, text, work, presets, stages, float_file)
    except BaseException:
        if not existed and float_file.is_relative_to(cache):  # made for this verify, which failed: not kept
            shutil.rmtree(cache / ws.model_hash, ignore_errors=True)
        raise


def _measure(ws: Workspace, picked, text: str, work: Path, presets: bool, stages, float_file: Path) -> list:
    from ..base import layers_of
    from ..points import LogProbs, runtime_point
    from . import ggml_type, preset_names

    doc = picked.config
    tokens = windows(ws, float_file)
    n_ctx = tokens.shape[1]
    # a front llama.cpp measured is already the runtime's arithmetic: nothing of torch's to set beside it
    by_llamacpp = picked.front.evaluations.evaluator == "llamacpp"
    with stages.stage("bitalloc's log-probabilities", 1 if by_llamacpp else 2):
        measured = LogProbs(ws, tokens)
        quantized = None if by_llamacpp else measured.config(doc)
    base, ours = work / "base-fp.kld", work / "base-bitalloc.kld"
    write_base(base, tokens, measured.reference)
    if quantized is None:
        bitalloc_kl = picked.point.loss
    else:
        write_base(ours, tokens, quantized)
        bitalloc_kl, _ = same_positions(measured.reference, quantized, tokens)
    names = tensor_names(doc.model.type, list(doc.layers), "--runtime")
    other = picked.front.model.other_bytes
    types_file = work / "types.txt"
    types_file.write_text(text)
    matrix = importance_matrix(ws, doc.quantizers)
    scored = tokens.shape[0] * (n_ctx - 1 - n_ctx // 2)
    with stages.stage("llama.cpp: quantize and measure", 2 + (len(preset_names(matrix)) if presets else 0)) as advance:
        fp_gap, _ = perplexity(float_file, base, n_ctx)
        advance(1)
        recipe = work / "recipe.gguf"
        tensors = quantize(float_file, recipe, types_file, ws, set(names.values()), matrix=matrix)
        details: dict[str, float] = {}
        if artifact_of(ws, doc):  # the artifact `build` writes from the levels, measured; the recipe's file beside
            from bitalloc.jobs.card import model_card

            from .build import build

            gguf_file = work / "model.gguf"
            built = build(ws, picked, model_card(picked).entries(), gguf_file)
            theirs, tensors = tensors, read_tensors(gguf_file)
            details.update(card_bytes=float(built["card_bytes"]), recipe_tensors_matching=float(sum(
                n in theirs and theirs[n].tensor_type == t.tensor_type and bytes(theirs[n].data) == bytes(t.data)
                for n, t in tensors.items())), tensors=float(len(tensors)))
        else:  # levels llama.cpp does not make (another quantizer's, or the nearest): its file of the recipe
            gguf_file = recipe
        for layer in layers_of(doc):
            wanted = ggml_type(layer.fmt, layer.in_features).value  # what the exported file asks for
            stored = tensors[names[layer.name]].tensor_type.name.lower()
            if stored != wanted.lower():
                raise BitallocError("--runtime", f"llama-quantize stored {layer.name} as {stored}, not {wanted}")
        matching = sum(same_blocks(tensors[names[n]], ws.levels.read(n, f)) for n, f in doc.formats().items() if f.ggml)
        kl, ppl = perplexity(gguf_file, base, n_ctx)
        if quantized is not None:
            details["vs_bitalloc_kl"], _ = perplexity(gguf_file, ours, n_ctx)
        advance(1)
        # whole-model bytes are the written file's without its model card (so the front's, when its bytes are
        # llama.cpp's, must equal them)
        stored = gguf_file.stat().st_size - int(details.get("card_bytes", 0)) - other
        points = [runtime_point("llamacpp", picked.point.label, other, stored, [gguf_file], kl, ppl, scored, picked,
                                bitalloc_loss=bitalloc_kl,
                                details={"fp_gap_kl": fp_gap, "layers_matching": float(matching),
                                         "embedding_bytes": float(embedding_bytes(tensors)), **details})]
        gguf_file.unlink()
        recipe.unlink(missing_ok=True)
        for preset in preset_names(matrix) if presets else ():
            path = work / f"{preset}.gguf"
            tensors = quantize(float_file, path, types_file, ws, set(names.values()), preset=preset,
                               matrix=matrix)  # the presets get the job's importance matrix too
            kl, ppl = perplexity(path, base, n_ctx)
            points.append(runtime_point("llamacpp", f"llama.cpp {preset}", other, path.stat().st_size - other, [path],
                                        kl, ppl, scored, kind="preset",
                                        details={"fp_gap_kl": fp_gap,
                                                 "embedding_bytes": float(embedding_bytes(tensors))}))
            path.unlink()
            advance(1)
    return points
