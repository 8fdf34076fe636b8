"""Levels of method gguf are llama.cpp's own: the blocks the built llama-quantize writes, read back by gguf-py, in the
loaded model's row order, at the type's block bytes. (The first test of a session builds llama.cpp's tools unless
the cache has them: 3-5 minutes on 2 cores.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from bitalloc.quantizers.gguf import tools as llamacpp
from bitalloc.formats import Format, weight_bytes
from bitalloc.quantizers.gguf.files import tensor_names
from helpers import filled_levels
from bitalloc.quantizers.store import Levels
from bitalloc.model import list_layers, load_model, select_layers


@pytest.fixture(scope="module")
def block0():
    model = load_model("smollm2-135m")
    layers = [l for l in select_layers(list_layers(model)) if ".layers.0." in l.name or l.embedding]
    formats = (Format.of_ggml("q8_0"), Format.of_ggml("q4_K"), Format.of_ggml("q5_0"))
    return model, layers, formats, filled_levels(model, layers, formats)


def _file_tensors(levels: Levels, tmp_path, ftype: str) -> dict:
    """The float GGUF quantized by hand with llama-quantize, as a user would, and read with gguf-py."""
    out = tmp_path / f"{ftype}.gguf"
    llamacpp.run("llama-quantize", ["--pure", str(levels.stores["gguf"].folder / "model-float.gguf"), str(out),
                                    ftype, "2"], "in a test")
    return {t.name: t for t in GGUFReader(out).tensors}


def test_levels_are_the_blocks_llama_quantize_writes(block0, tmp_path):
    model, layers, formats, levels = block0
    q4k = Format.of_ggml("q4_K")
    file = _file_tensors(levels, tmp_path, "Q4_K")
    names = tensor_names(model.model_type, [l.name for l in layers])
    checked = 0
    for layer in layers:
        tensor = file[names[layer.name]]
        if not q4k.fits(layer.in_features):  # 576-wide rows: llama.cpp falls back, and so does a uniform config
            assert tensor.tensor_type.name == "Q5_0" and levels.read(layer.name, q4k).fmt.ggml == "q5_0"
            continue
        level = levels.read(layer.name, q4k)
        blocks = np.asarray(tensor.data).reshape(layer.out_features, -1)
        assert torch.equal(level.blocks, torch.from_numpy(np.array(blocks)))  # down_proj: rows in the same order
        assert level.nbytes == weight_bytes(layer.out_features, layer.in_features, q4k)
        checked += 1
    assert checked == 1


def test_the_tensor_index_reads_what_gguf_py_reads(block0, tmp_path):
    """bitalloc's metadata-skipping reader (what levels and verify read files with) sees every tensor as gguf-py's
    own reader does: name, type, shape, bytes and data."""
    from bitalloc.quantizers.gguf.index import read_tensors

    _, _, _, levels = block0
    file = tmp_path / "Q4_K.gguf"
    _file_tensors(levels, tmp_path, "Q4_K")
    theirs = {t.name: t for t in GGUFReader(file).tensors}
    ours = read_tensors(file)
    assert ours.keys() == theirs.keys() and len(ours) > 200
    for name, t in theirs.items():
        o = ours[name]
        assert (o.tensor_type, o.shape, o.n_bytes) == (t.tensor_type, tuple(t.shape.tolist()), t.n_bytes), name
        assert o.data.dtype == t.data.dtype and np.array_equal(o.data, t.data), name


def test_rows_are_in_the_loaded_models_order(block0, tmp_path):
    """llama.cpp stores Q and K rows permuted for its rotary embedding; a level holds them as transformers does, so
    q8_0 (nearly lossless) reads back as the weight itself, and its rows are the file's rows (the token embedding's,
    row by row, as llama.cpp's lookup reads them)."""
    model, layers, formats, levels = block0
    q8 = Format.of_ggml("q8_0")
    file = _file_tensors(levels, tmp_path, "Q8_0")
    names = tensor_names(model.model_type, [l.name for l in layers])
    assert names[layers[0].name] == "token_embd.weight"
    for layer in layers:
        w = model.weight(layer).float()
        level = levels.read(layer.name, q8)
        assert float((level.dequantize() - w).pow(2).sum() / w.pow(2).sum()) < 1e-4, layer.name
        rows = np.asarray(file[names[layer.name]].data).reshape(layer.out_features, -1)
        ours = level.blocks.numpy()
        assert sorted(map(bytes, rows)) == sorted(map(bytes, ours)), layer.name
        assert torch.equal(levels.weight(layer.name, q8), level.dequantize(w.dtype))


def test_a_llamacpp_target_job_exports_to_llama_cpp_as_it_is(tiny_smollm, text_dir, tmp_path, capsys):
    """A model with rows too short for the k-quants' 256-blocks (64 wide) and rows that take them (256) searched over
    llama.cpp's types, its tied token embedding included: every front point is of llama.cpp's types, only where the
    rows take them, its bytes are the GGUF file's, and the export needs no --nearest."""
    import yaml

    from bitalloc.cli import main
    from bitalloc.quantizers.gguf.ggml import GGML_TYPES
    from conftest import front_of

    out = tmp_path / "out"
    spec = {"name": "llamacpp", "model": {"source": str(tiny_smollm)}, "formats": {"target": "llamacpp"},
            "data": {"source": [str(text_dir / "*.txt")], "seq_len": 64, "calibration": 1, "evaluation": 1,
                     "batch_size": 1},
            "search": {"budgets": [4.6], "points": 1}, "run": {"workers": 0}, "tracking": {"enabled": False},
            "output": str(out)}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(tmp_path / "job.yaml")])
    front = front_of(out)
    mixed = [p for p in front.mixed]
    assert mixed
    from bitalloc.results import read_config

    doc = read_config(out / mixed[0].config)
    for name, fmt in doc.formats().items():  # a llama.cpp type whose blocks fit, or f16
        out_f, in_f = doc.shapes[name]
        assert (fmt.ggml in GGML_TYPES and in_f % GGML_TYPES[fmt.ggml].block == 0) or fmt.name == "fp16", name
    assert doc.embeddings == ["model.embed_tokens"] and doc.formats()["model.embed_tokens"].quantized
    assert front.model.bytes_of == "llamacpp"  # the GGUF file's bytes: its blocks, each tensor padded to 32 bytes
    assert doc.totals.bytes == front.model.other_bytes + sum(
        -(-o * (GGML_TYPES[f.ggml].row_bytes(i) if f.quantized else 2 * i) // 32) * 32
        for f, (o, i) in ((doc.formats()[n], doc.shapes[n]) for n in doc.shapes))
    capsys.readouterr()
    main(["export", str(out), "--point", "1", "--format", "llamacpp", "-o", str(tmp_path / "types.txt")])
    said = capsys.readouterr().out
    assert "nearest" not in said and "note:" not in said
    lines = (tmp_path / "types.txt").read_text().splitlines()
    assert len(lines) == len(doc.layers) and all(line.split("=")[1] in (*GGML_TYPES, "f16") for line in lines)


def test_a_model_folder_is_converted_by_llama_cpps_own_script(smollm2_tokenizer, tmp_path):
    """A bfloat16 checkpoint folder (SmolLM2's tokenizer) goes through convert_hf_to_gguf.py; its levels hold the
    loaded weight's rows (q and k are permuted in the GGUF) and match the weight to q8_0's precision."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    layers = select_layers(list_layers(model))
    q8 = Format.of_ggml("q8_0")
    levels = filled_levels(model, layers, [q8])
    for layer in layers:
        w = model.weight(layer).float()
        assert float((levels.weight(layer.name, q8).float() - w).pow(2).sum() / w.pow(2).sum()) < 1e-4, layer.name
