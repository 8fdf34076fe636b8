"""The quantizers behind `formats.method`: each makes better levels with more bits, stores exactly the bytes the cost
model counts, and does what it is for (GPTQ uses input correlations, clipping never adds error); llama.cpp's levels
are what its own llama-quantize writes; a runtime target offers only what the runtime stores for each shape."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, weight_bytes
from bitalloc.quantizers.gptq import gptq
from bitalloc.kernels.packed import dequantize_packed, pack
from bitalloc.quantizers import get_quantizer


def _correlated(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, inputs X whose columns are strongly correlated, H = 2 XᵀX / n)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(512, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = x + 0.1 * torch.randn(512, cols, generator=g)
    return w, x, 2 * x.t() @ x / x.shape[0]


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("method", ["rtn", "rtn-int", "clip", "gptq", "hqq"])
def test_error_falls_with_bits_and_bytes_are_the_stored_size(method):
    w, x, h = _correlated(48, 256)
    quantizer = get_quantizer(method)
    inputs = {"hessian": h, "diagonal": x.pow(2).mean(0)}.get(quantizer.inputs)
    errors = []
    for bits in (2, 3, 4, 8):
        fmt = Format(bits, 64, False, "float16", method)
        level = quantizer.quantize(w, fmt, inputs)
        errors.append(_output_error(x, w, dequantize_packed(level)))
        if method in ("rtn", "rtn-int", "clip"):  # bitalloc's layout is the stored form itself
            shape = 16 if method == "rtn-int" else 0  # compressed-tensors' int64 [out, in] weight_shape
            assert level.nbytes + shape == weight_bytes(*w.shape, fmt)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, errors


GPTQMODEL_BYTES = """
import json, sys
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
out = {}
for bits, sym, rows, cols in json.loads(sys.argv[1]):
    layer = TorchLinear(bits=bits, group_size=64, sym=sym, desc_act=False, in_features=cols, out_features=rows,
                        bias=False)
    parts = {n: b for n, b in layer.named_buffers() if n in ("qweight", "qzeros", "scales", "g_idx")}
    out[f"{bits},{sym},{rows},{cols}"] = [sorted(parts), sum(b.numel() * b.element_size() for b in parts.values())]
print(json.dumps(out))
"""


def test_gptq_bytes_are_what_gptqmodels_layer_stores():
    """GPTQModel's own quantized layer holds exactly the bytes bitalloc counts for method gptq: its checkpoint's
    qweight, qzeros, scales and g_idx, for every bit width GPTQ packs, both symmetries and rows of several widths."""
    from bitalloc.runtimes.python import ROOT

    python = os.environ.get("BITALLOC_RUNTIMES_PYTHON") or str(ROOT / ".venv-runtimes" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip("no .venv-runtimes (`./dev test` builds it): GPTQModel is not installed")
    cases = [(b, s, rows, cols) for b in (2, 3, 4, 8) for s in (True, False) for rows, cols in ((64, 256), (96, 576))]
    done = subprocess.run([python, "-c", GPTQMODEL_BYTES, json.dumps(cases)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    stored = json.loads(done.stdout.strip().splitlines()[-1])
    for b, s, rows, cols in cases:
        names, nbytes = stored[f"{b},{s},{rows},{cols}"]
        assert names == ["g_idx", "qweight", "qzeros", "scales"]
        assert nbytes == weight_bytes(rows, cols, Format(b, 64, s, "float16", "gptq")), (b, s, rows, cols)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_levels_are_what_hqqs_runtime_makes(bits):
    """HQQLinear with HQQ's BaseQuantizeConfig on the float16 layer (as its runtime quantizes a model) dequantizes to
    bitalloc's hqq level, every weight up to float16 arithmetic (2^-10 of the largest)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    layer = torch.nn.Linear(192, 96, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 192, generator=torch.Generator().manual_seed(bits)) * 0.02)
    ours = dequantize_packed(get_quantizer("hqq").quantize(layer.weight.detach(), Format(bits, 64, False, "float16",
                                                                                              "hqq")))
    runtime = HQQLinear(layer.half(), BaseQuantizeConfig(nbits=bits, group_size=64), compute_dtype=torch.float16,
                        device="cpu")
    theirs = runtime.dequantize().reshape(96, 192).float()
    assert float((theirs - ours).abs().max()) <= 2**-10 * float(ours.abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_bytes_are_what_hqq_packs(bits):
    from hqq.core.quantize import Quantizer as HQQ

    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(bits))
    packed, meta = HQQ.quantize(w, nbits=bits, group_size=64, axis=1, bitpack=True, compute_dtype=torch.float16,
                                device="cpu")
    stored = packed.numel() * packed.element_size() + 2 * meta["scale"].numel() * 2
    assert stored == weight_bytes(96, 192, Format(bits, 64, False, "float16", "hqq"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_int_is_gptq_without_correlations(bits, symmetric):
    """On uncorrelated inputs (identity Hessian) GPTQ has no error to spread: it rounds to nearest on its grid, which
    is what rtn-int (llm-compressor's RTN grid) makes."""
    w, _, _ = _correlated(32, 128, seed=bits)
    fmt = Format(bits, 64, symmetric, "float16", "gptq")
    q, _ = gptq(w, torch.eye(128), fmt)
    ours = get_quantizer("rtn-int").quantize(w, Format(bits, 64, symmetric, "float16", "rtn-int"))
    assert torch.equal(dequantize_packed(ours), dequantize_packed(pack(q)))


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    w, x, h = _correlated(64, 256, seed=3)
    for bits in (2, 3, 4):
        rtn = dequantize_packed(get_quantizer("rtn").quantize(w, Format(bits, 64, True)))
        ours = dequantize_packed(get_quantizer("gptq").quantize(w, Format(bits, 64, True, "float16", "gptq"), h))
        assert _output_error(x, w, ours) < 0.7 * _output_error(x, w, rtn), bits


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_ct_takes_every_groups_grid_from_the_original_weights(act_order):
    """llm-compressor's GPTQ fixes each group's scale and zero point from the original weights (its observer) before
    spreading errors: gptq-ct's scales and zero points are rtn-int's whatever the order, while the codes differ."""
    w, _, h = _correlated(32, 256, seed=7)
    ct = get_quantizer("gptq-ct", act_order=act_order).quantize(w, Format(3, 64, False, "float16", "gptq-ct"), h)
    rtn = get_quantizer("rtn-int").quantize(w, Format(3, 64, False, "float16", "rtn-int"))
    assert torch.equal(ct.scales, rtn.scales) and torch.equal(ct.zeros, rtn.zeros)
    assert not torch.equal(ct.qweight, rtn.qweight)


def test_gptq_act_order_keeps_groups_of_consecutive_columns():
    w, x, h = _correlated(32, 256, seed=5)
    fmt = Format(3, 64, False, "float16", "gptq")
    plain = get_quantizer("gptq").quantize(w, fmt, h)
    ordered = get_quantizer("gptq", act_order=True).quantize(w, fmt, h)
    assert ordered.scales.shape == plain.scales.shape == (32, 4)
    assert _output_error(x, w, dequantize_packed(ordered)) < 2 * _output_error(x, w, dequantize_packed(plain))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(8, 160), group=st.sampled_from([16, 32, 64]),
       bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(), weighted=st.booleans(), seed=st.integers(0, 999))
def test_clipping_never_increases_the_squared_error(rows, cols, group, bits, symmetric, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g).exp()
    d = torch.rand(cols, generator=g) if weighted else None
    fmt_rtn, fmt_clip = Format(bits, group, symmetric), Format(bits, group, symmetric, "float16", "clip")
    clip = dequantize_packed(get_quantizer("clip").quantize(w, fmt_clip, d))
    rtn = dequantize_packed(get_quantizer("rtn").quantize(w, fmt_rtn))
    weight = torch.ones(cols) if d is None else d
    assert float(((w - clip).pow(2) * weight).sum()) <= float(((w - rtn).pow(2) * weight).sum()) * (1 + 1e-6) + 1e-9


def test_clipping_helps_a_row_with_an_outlier():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    w[:, 7] *= 12  # one outlier column: min-max spends the whole grid on it
    fmt = Format(3, 64)
    rtn = dequantize_packed(get_quantizer("rtn").quantize(w, fmt))
    clip = dequantize_packed(get_quantizer("clip").quantize(w, Format(3, 64, False, "float16", "clip")))
    assert float((w - clip).pow(2).sum()) < 0.9 * float((w - rtn).pow(2).sum())


def test_quantizer_parameters_are_checked_by_value():
    with pytest.raises(BitallocError, match="formats.params.damp"):
        get_quantizer("gptq", damp=2.0)
    with pytest.raises(BitallocError, match="formats.params.grid"):
        get_quantizer("clip", grid=0)
    with pytest.raises(BitallocError, match="not a parameter of hqq"):
        get_quantizer("hqq", damp=0.1)
