"""Packed format, Triton kernels (run by the Triton interpreter on CPU tensors), QuantLinear, packed checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc import load_packed
from bitalloc.results import read_config
from bitalloc.evaluate import Evaluator
from helpers import filled_levels
from bitalloc.quantizers.store import Levels
from bitalloc.formats import QUANT_BITS, Format, weight_bytes
from bitalloc.kernels.packed import dequantize_packed, pack, pack_codes, unpack, unpack_codes
from bitalloc.kernels.quant_embedding import QuantEmbedding
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.kernels.rtn import dequantize, quantize
from bitalloc.model import list_layers, load_model

from conftest import front_of, tiny_job

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(QUANT_BITS), out=st.integers(1, 5), cols=st.integers(1, 140), seed=st.integers(0, 999))
def test_pack_unpack_round_trip_is_exact(bits, out, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, cols), generator=g)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (out, -(-cols * bits // 32))
    assert torch.equal(unpack_codes(words, bits, cols), codes)


def test_three_bits_pack_32_codes_into_3_words():
    codes = torch.arange(32).remainder(8).reshape(1, 32)
    assert pack_codes(codes, 3).shape == (1, 3)
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, 32), codes)


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_bytes_are_the_cost_model_bytes_and_dequantize_alike(bits, symmetric):
    w = torch.randn(7, 75, generator=torch.Generator().manual_seed(bits))
    fmt = Format(bits, 32, symmetric)
    q = quantize(w, fmt)
    p = pack(q)
    assert p.nbytes == weight_bytes(7, 75, fmt)
    assert torch.equal(unpack(p).codes, q.codes)
    assert torch.equal(dequantize_packed(p), dequantize(q))


def _interpreted(code: str) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (the switch is read when Triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_triton_kernels_match_the_torch_reference_for_every_bit_width():
    """GEMV and GEMM, every bit width, both symmetries, shapes that leave partial tiles, groups and words."""
    _interpreted("""
import torch
from bitalloc.formats import QUANT_BITS, Format
from bitalloc.kernels.packed import dequantize_packed, pack_weight
from bitalloc.kernels.triton_matmul import packed_matmul
g = torch.Generator().manual_seed(0)
for bits in QUANT_BITS:
    for sym in (False, True):
        for n, k, group in ((40, 100, 32), (17, 96, 64)):
            p = pack_weight(torch.randn(n, k, generator=g), Format(bits, group, sym))
            w = dequantize_packed(p)
            for m, kernel in ((1, "gemv"), (3, "gemv"), (19, "gemm")):
                x = torch.randn(m, k, generator=g)
                y = packed_matmul(x, p, kernel)
                ref = x @ w.t()
                err = (y - ref).abs().max().item()
                assert err <= 1e-4 * (1 + ref.abs().max().item()), (bits, sym, n, k, m, kernel, err)
for dtype in (torch.float16, torch.bfloat16):
    p = pack_weight(torch.randn(24, 64, generator=g), Format(3, 32, False))
    x = torch.randn(2, 64, generator=g).to(dtype)
    y = packed_matmul(x, p)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float() @ dequantize_packed(p).t(), atol=0.05, rtol=0.02)
""")


def test_quant_linear_runs_the_kernel_under_the_interpreter_and_equals_the_cpu_path():
    _interpreted("""
import torch
from bitalloc.formats import Format
from bitalloc.kernels.packed import pack_weight
from bitalloc.kernels.quant_linear import QuantLinear
import bitalloc.kernels.triton_matmul as tm
calls = []
real = tm.packed_matmul
tm.packed_matmul = lambda *a, **k: calls.append(1) or real(*a, **k)
g = torch.Generator().manual_seed(1)
layer = QuantLinear.from_packed(pack_weight(torch.randn(12, 40, generator=g), Format(5, 16, True)),
                                torch.randn(12, generator=g), torch.float32)
x = torch.randn(2, 3, 40, generator=g)
y = layer(x)
assert calls, "the Triton kernel did not run"
from bitalloc.kernels.packed import dequantize_packed
torch.testing.assert_close(y, x @ dequantize_packed(layer.packed).t() + layer.bias, atol=1e-4, rtol=1e-4)
""")


def test_packed_experts_run_each_experts_rows_on_the_kernel_under_the_interpreter():
    """A packed expert projection hands the kernel one expert's rows of the stacked level (a view into it) and gets
    that expert's product, for every expert."""
    _interpreted("""
import torch
from bitalloc.formats import Format
from bitalloc.kernels.packed import dequantize_packed, pack_weight
from bitalloc.kernels.quant_experts import PackedProjection
import bitalloc.kernels.triton_matmul as tm
calls = []
real = tm.packed_matmul
tm.packed_matmul = lambda *a, **k: calls.append(1) or real(*a, **k)
g = torch.Generator().manual_seed(2)
experts, out, k = 3, 10, 48
proj = PackedProjection.of(pack_weight(torch.randn(experts * out, k, generator=g), Format(3, 16, False)), experts)
w = dequantize_packed(proj.packed).reshape(experts, out, k)
for e in range(experts):
    x = torch.randn(4, k, generator=g)
    torch.testing.assert_close(proj(x, e), x @ w[e].t(), atol=1e-4, rtol=1e-4)
assert len(calls) == experts, "the Triton kernel did not run"
""")


def test_quant_linear_falls_back_with_a_warning_for_inputs_the_kernels_cannot_take():
    from bitalloc.kernels.packed import pack_weight

    layer = QuantLinear.from_packed(pack_weight(torch.randn(6, 20), Format(4, 8)), None, torch.float64)
    x = torch.randn(2, 20, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import bitalloc.kernels.quant_linear as ql

        orig = ql._triton_matmul
        ql._triton_matmul = lambda: (orig()[0], True)
        try:
            y = layer(x)
        finally:
            ql._triton_matmul = orig
    assert any("torch dequantize path" in str(w.message) for w in caught)
    torch.testing.assert_close(y, x @ dequantize_packed(layer.packed, torch.float64).t())


@pytest.fixture(scope="module")
def tiny_front(tiny_llama, text_dir, tmp_path_factory):
    from bitalloc.jobs.runner import run_job
    from bitalloc.jobs.spec import parse_spec

    out = tmp_path_factory.mktemp("kern") / "out"
    spec = tiny_job(tiny_llama, text_dir, out, tracking={"enabled": False})
    run_job(parse_spec(spec))
    return out


def test_packed_checkpoint_equals_the_evaluators_model(tiny_front, tiny_llama, tmp_path):
    """`bitalloc pack` then `load_packed`: same logits as the evaluator's dequantized weights."""
    done = subprocess.run([sys.executable, "-m", "bitalloc.cli", "pack", str(tiny_front), "--point", "2", "-o",
                           str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    formats = read_config(tmp_path / "ckpt" / "bitalloc_config.json").formats()
    model = load_model(str(tiny_llama))
    chosen = [l for l in list_layers(model) if l.name in formats]
    tokens = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    levels = filled_levels(model, chosen, sorted(set(formats.values())))
    evaluator = Evaluator(model, levels, tokens, 2)
    with evaluator.streamed(formats), torch.no_grad():
        expected = model.module(tokens).logits
    packed = load_packed(tmp_path / "ckpt")
    quant = {m.qweight.data_ptr(): m for m in packed.module.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert len(quant) == sum(f.quantized for f in formats.values())  # a tied head shares its table's buffers
    assert sum(m.packed.nbytes for m in quant.values()) == sum(
        weight_bytes(l.out_features, l.in_features, formats[l.name]) for l in chosen if formats[l.name].quantized)
    with torch.no_grad():
        torch.testing.assert_close(packed.module(tokens).logits, expected, atol=1e-3, rtol=1e-3)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(QUANT_BITS), st.sampled_from([16, 32, 64]), st.integers(1, 40), st.integers(1, 70),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_a_quant_embedding_looks_up_the_dequantized_rows_of_its_table(bits, group, vocab, dim, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    packed = pack(quantize(torch.randn(vocab, dim, generator=gen), Format(bits, group, symmetric)))
    root = torch.nn.ModuleDict({"embed": torch.nn.Embedding(vocab, dim)})
    QuantEmbedding.swap_in(root, "embed", packed)
    ids = torch.randint(0, vocab, (3, 5), generator=gen)
    assert root["embed"](ids).equal(dequantize_packed(packed, torch.float32)[ids])


def test_a_packed_tied_embedding_is_stored_once_and_looks_up_its_rows(tiny_front, tiny_llama, tmp_path):
    """A uniform point quantizes the token embedding too: the checkpoint packs it row by row (a QuantEmbedding) and
    its tied head is a QuantLinear over the same buffers, saved once and loaded back sharing them; lookups and
    logits are what the evaluator measured with the dequantized table at both uses."""
    from safetensors import safe_open

    from bitalloc.runtimes.bitalloc.checkpoint import pack

    config = read_config(sorted((tiny_front / "configs").glob("uniform-w3*.json"))[0])
    (embedding,) = config.embeddings
    fmt = config.formats()[embedding]
    assert fmt.quantized
    pack(config, tmp_path / "ckpt", front_of(tiny_front).data.hash)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert sum(k.endswith(".qweight") for k in keys) == sum(f.quantized for f in config.formats().values())
    assert not any(k.endswith("embed_tokens.weight") or k == "lm_head.weight" for k in keys)
    packed = load_packed(tmp_path / "ckpt")
    table, head = packed.module.get_input_embeddings(), packed.module.get_output_embeddings()
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear) and head.qweight is table.qweight
    model = load_model(str(tiny_llama))
    layers = [l for l in list_layers(model) if l.name in config.formats()]
    tokens = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    levels = filled_levels(model, layers, sorted({f for f in config.formats().values() if f.quantized}))
    level = dequantize_packed(levels.read(embedding, fmt), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(table(tokens), level[tokens])
        with Evaluator(model, levels, tokens, 2).streamed(config.formats()):
            expected = model.module(tokens).logits
        torch.testing.assert_close(packed.module(tokens).logits, expected, atol=1e-3, rtol=1e-3)


def test_packed_evaluation_measures_what_the_dequantized_evaluation_does(tiny_llama):
    """What GPU workers run (packed weights through QuantLinear) gives the CPU evaluator's numbers."""
    model = load_model(str(tiny_llama))
    layers = [l for l in list_layers(model) if l.tied_to is None]
    fmts = (Format(3, 32), Format(8, 32, True))
    tokens = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = filled_levels(model, layers, fmts)
    packed = Levels(model, layers, fmts, plain.stores, device="cpu")  # a GPU worker's levels, on the CPU
    evaluator = Evaluator(model, plain, tokens, 2)
    assignment = {l.name: fmts[i % 2] for i, l in enumerate(layers)}
    expected = evaluator.evaluate(assignment)
    evaluator.levels = packed
    got = evaluator.evaluate(assignment)
    assert got.loss == pytest.approx(expected.loss, rel=1e-4, abs=1e-7) and got.quality == pytest.approx(expected.quality, rel=1e-5)
    assert not any(isinstance(m, QuantLinear) for m in model.module.modules())


def test_bad_pack_and_latency_requests_are_one_line_errors(tiny_front, tmp_path):
    for args, field in ((["pack", str(tiny_front), "--point", "99", "-o", str(tmp_path / "c")], "--point"),
                        (["pack", str(tmp_path), "--point", "1", "-o", str(tmp_path / "c")], "TARGET"),
                        (["latency", "x", "-o", str(tmp_path / "l.json")], "latency")):
        done = subprocess.run([sys.executable, "-m", "bitalloc.cli", *args], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith(f"error: {field}:"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not (tmp_path / "l.json").exists()
