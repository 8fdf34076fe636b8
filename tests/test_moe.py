"""Mixture-of-experts models: every expert weight is a unit of the search, quantized expert by expert, measured
streamed, counted in exact bytes; weights bitalloc cannot quantize are named, and a job that would search too
little of a model refuses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.formats import Format
from bitalloc.kernels.packed import dequantize_packed
from bitalloc.model import coverage, from_module, list_layers, other_bytes, uncovered
from bitalloc.quantizers import Calibration, get_quantizer

from helpers import filled_levels

W4 = Format(4, 32, False)
W2 = Format(2, 32, False)


def _mixtral(**extra):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=64, **extra))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
                                              max_position_embeddings=64))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                          layer_types=["full_attention"] * 2))


class PerExpertLinear(nn.Module):
    """An older-style MoE: experts as nn.Linear modules (`experts.N.gate_proj`), a Linear router."""

    def __init__(self, hidden=32, inter=64, experts=4, vocab=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"gate_proj": nn.Linear(hidden, inter, bias=False),
                                                    "up_proj": nn.Linear(hidden, inter, bias=False),
                                                    "down_proj": nn.Linear(inter, hidden, bias=False)})
                                     for _ in range(experts))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        weights = torch.softmax(self.gate(h), -1)
        out = sum(weights[..., e:e + 1] * x["down_proj"](nn.functional.silu(x["gate_proj"](h)) * x["up_proj"](h))
                  for e, x in enumerate(self.experts))
        return self.head(h + out)


ARCHITECTURES = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe, "gpt_oss": _gpt_oss}


def _model(arch):
    torch.manual_seed(0)
    module = ARCHITECTURES[arch]().float()
    return from_module(module, source=f"tiny-{arch}")


def _expert_params(module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if ".experts." in n and p.dim() == 3)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_expert_weight_is_a_unit_with_exact_bytes(arch):
    model = _model(arch)
    layers = list_layers(model)
    experts = [l for l in layers if l.experts]
    assert sum(l.numel for l in experts) == _expert_params(model.module)  # every expert weight, nothing twice
    assert {l.name.rsplit(".", 1)[1] for l in experts} == {"gate_proj", "up_proj", "down_proj"}
    assert not any(l.name.endswith((".gate", ".router", "shared_expert_gate")) for l in layers)  # routers never
    for l in experts:
        assert model.weight(l).shape == l.shape
        assert l.bytes_at(W4) == l.experts * l.out_features * (l.in_features * 4 // 8 + 2 * 2 * l.in_features // 32)
    searched, total = coverage(model, layers)
    assert searched / total >= 0.95
    # bytes: the searched units' plus everything else, each parameter once
    float_bytes = sum(t.numel() * t.element_size() for t in [*model.module.parameters(), *model.module.buffers()])
    assert other_bytes(model, layers) + sum(l.numel * 4 for l in layers if not l.tied_to) == float_bytes


def test_gpt_oss_units_read_its_transposed_interleaved_layout():
    model = _model("gpt_oss")
    experts = model.module.model.layers[0].mlp.experts
    by_name = {l.name: l for l in list_layers(model)}
    gate = by_name["model.layers.0.mlp.experts.gate_proj"]
    up = by_name["model.layers.0.mlp.experts.up_proj"]
    assert torch.equal(model.weight(gate), experts.gate_up_proj[..., ::2].transpose(1, 2))
    assert torch.equal(model.weight(up), experts.gate_up_proj[..., 1::2].transpose(1, 2))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_a_level_read_back_equals_the_quantizer_output_expert_by_expert(arch):
    model = _model(arch)
    layers = [l for l in list_layers(model) if l.experts]
    levels = filled_levels(model, layers, (W4,))
    rtn = get_quantizer("rtn")
    for layer in layers:
        level = levels.read(layer.name, W4)
        rows = layer.out_features
        for e in range(layer.experts):
            own = rtn.quantize(model.weight(layer)[e], W4)
            assert torch.equal(level.qweight[e * rows:(e + 1) * rows], own.qweight)
            assert torch.equal(level.scales[e * rows:(e + 1) * rows], own.scales)
        assert level.nbytes == layer.bytes_at(W4)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_streamed_evaluation_equals_the_weights_quantized_in_memory(arch):
    from bitalloc.evaluate import Evaluator

    model = _model(arch)
    layers = list_layers(model)
    formats = (W2, W4)
    levels = filled_levels(model, layers, formats)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    assignment = {l.name: formats[i % 2] for i, l in enumerate(layers)}
    before = {n: p.clone() for n, p in model.module.named_parameters()}
    evaluator = Evaluator(model, levels, tokens, 2)
    streamed = evaluator.evaluate(assignment)
    in_memory = {}
    for l in layers:
        level = levels.read(l.name, assignment[l.name])
        in_memory[l.name] = model.stored(l, dequantize_packed(level, torch.float32).reshape(l.shape))
    assert evaluator.evaluate_tensors(in_memory) == streamed
    assert streamed.loss > 0
    for n, p in model.module.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_packed_experts_compute_the_levels_and_load_back_from_their_own_tensors(arch, tmp_path):
    """bitalloc's packed checkpoint on every experts layout (gpt-oss: transposed, interleaved, biased): blocks whose
    projections are packed at different formats, one at float16, one unsearched, compute the evaluator's logits;
    the weights file is the size the front counts, and loads into a fresh model's empty packed modules to the same
    logits."""
    from safetensors.torch import load_model, save_model

    from bitalloc.kernels.quant_experts import PackedProjection, QuantExperts
    from bitalloc.runtimes.bitalloc.checkpoint import _empty_quant_layers, quantize_model
    from bitalloc.runtimes.bitalloc.folder import _weights
    from bitalloc.runtimes.folder import safetensors_bytes

    model = _model(arch)
    units = [l for l in list_layers(model) if l.experts]
    f16 = Format(16)
    assignment = {l.name: (W4, W2, f16)[i % 3] for i, l in enumerate(units[:-1])}  # the last one unsearched
    levels = filled_levels(model, units, (W2, W4))
    reference = _model(arch)
    counted = _weights(reference.module, assignment, list_layers(reference))
    for l in units[:-1]:
        fmt = assignment[l.name]
        w = (dequantize_packed(levels.read(l.name, fmt), torch.float32).reshape(l.shape) if fmt.quantized
             else model.weight(l).half().float())
        reference.put(l, reference.stored(l, w))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    quantize_model(model, assignment, levels.read)
    with torch.no_grad():
        expected, packed = reference.module(ids).logits, model.module(ids).logits
    assert torch.allclose(packed, expected, atol=1e-5, rtol=1e-5)
    blocks = [m for m in model.module.modules() if isinstance(m, QuantExperts)]
    assert len(blocks) == 2 and all(isinstance(b.up_proj, PackedProjection) or isinstance(b.gate_proj,
                                                                                           PackedProjection)
                                    for b in blocks)
    save_model(model.module, str(tmp_path / "model.safetensors"))
    assert safetensors_bytes(*counted[:2]) == (tmp_path / "model.safetensors").stat().st_size  # the front's count
    fresh = _model(arch)
    _empty_quant_layers(fresh, assignment)
    missing, unexpected = load_model(fresh.module, str(tmp_path / "model.safetensors"), strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing)
    with torch.no_grad():
        assert torch.equal(fresh.module(ids).logits, packed)


def test_clip_calibrates_each_expert_on_the_tokens_routed_to_it():
    model = _model("mixtral")
    layers = [l for l in list_layers(model) if l.experts][:3]
    tokens = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    clip = get_quantizer("clip")
    levels = filled_levels(model, layers, (Format(3, 32, False, method="clip"),), {"clip": clip},
                           Calibration(tokens, "test"))
    few, experts = clip.data_free
    assert experts == sum(l.experts for l in layers) and few < experts
    from bitalloc.quantizers.inputs import collect

    stats = collect(model, layers, tokens, "diagonal")
    fmt = levels.formats[0]
    for layer in layers:
        level = levels.read(layer.name, fmt)
        rows = layer.out_features
        for e in range(layer.experts):
            own = clip.quantize(model.weight(layer)[e], fmt, stats[layer.name][e])
            assert torch.equal(level.qweight[e * rows:(e + 1) * rows], own.qweight)


@pytest.mark.parametrize("estimator", ["fisher", "sqnr", "hawq"])
def test_estimators_score_expert_units(estimator):
    from bitalloc.sensitivity import EstimatorContext, get_estimator
    from bitalloc.sensitivity.base import run_estimator

    model = _model("mixtral")
    layers = list_layers(model)
    formats = (W2, W4)
    levels = filled_levels(model, layers, formats)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    params = {"hawq": {"max_probes": 4, "min_probes": 2}, "sqnr": {"activations": True}}.get(estimator, {})
    ctx = EstimatorContext(model, layers, formats, levels, tokens, "test", 0)
    table = run_estimator(get_estimator(estimator, **params), ctx)
    experts = [i for i, l in enumerate(layers) if l.experts]
    values = table.values[experts]
    if estimator != "hawq":  # a Hutchinson trace may come out negative for a unit; clipped at 0
        assert (values > 0).all()
    assert (values[:, 0] >= values[:, 1]).all()  # 2-bit hurts more than 4-bit


def test_per_expert_linear_experts_are_tied_per_projection_and_the_router_left_alone():
    from bitalloc.experts import expert_ties

    model = from_module(PerExpertLinear())
    layers = list_layers(model)
    names = [l.name for l in layers]
    assert "gate" not in names and "head" in names
    ties = expert_ties(names)
    assert sorted(sorted(names[i] for i in g) for g in ties) == [
        [f"experts.{e}.{p}" for e in range(4)] for p in ("down_proj", "gate_proj", "up_proj")]


class Unknown(nn.Module):
    """A model whose largest weight lives in a module bitalloc does not know."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mix = nn.Parameter(torch.randn(8, 32, 256))
        self.head = nn.Linear(32, 64, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + torch.einsum("btd,edf->btf", h, self.mix)[..., :32])


def test_an_unknown_large_weight_is_named_with_why():
    model = from_module(Unknown())
    layers = list_layers(model)
    found = {u.name: u.why for u in uncovered(model, layers)}
    assert "cannot quantize" in found["mix"] and "embedding" in found["embed.weight"]
    searched, total = coverage(model, layers)
    assert searched / total < 0.5


def test_the_upcycled_model_computes_the_dense_models_function():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.upcycle import upcycle

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    moe = upcycle(dense, experts=4, top_k=2, seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        np.testing.assert_allclose(moe(ids).logits.numpy(), dense(ids).logits.numpy(), atol=1e-5)
        e = moe.model.layers[0].mlp.experts.gate_up_proj
        assert not torch.equal(e[0], e[1])  # a different tensor per expert


@pytest.mark.parametrize("arch,model_type", [("mixtral", "mixtral"), ("qwen3_moe", "qwen3_moe"),
                                             ("qwen2_moe", "qwen2_moe"), ("gpt_oss", "gpt_oss")])
def test_the_llamacpp_export_names_every_expert_tensor(arch, model_type):
    import re

    from bitalloc.runtimes import get_runtime
    from bitalloc.runtimes.base import Layer

    model = _model(arch)
    layers = [Layer(l.name, Format.of_ggml("q4_K" if l.in_features % 256 == 0 else "q4_0"), l.out_features,
                    l.in_features, l.experts) for l in list_layers(model) if l.name != "lm_head"]
    text, _ = get_runtime("llamacpp").export(layers, model_type, nearest=True)
    names = [re.match(r"\^(.*)\$=", line)[1].replace("\\", "") for line in text.splitlines()]
    for block in (0, 1):
        for proj in ("gate", "up", "down"):
            assert f"blk.{block}.ffn_{proj}_exps.weight" in names
    if arch == "qwen2_moe":
        assert "blk.0.ffn_gate_shexp.weight" in names


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory, smollm2_tokenizer):
    """A tiny Mixtral checkpoint folder (rows llama.cpp's blocks take, SmolLM2's tokenizer)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(MixtralConfig(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=256,
                                     tie_word_embeddings=True)).float().save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def _moe_job(folder, text_dir, out, formats: dict, points: int):
    import yaml

    from bitalloc.cli import main
    from conftest import tiny_job

    spec = tiny_job(folder, text_dir, out, data={"seq_len": 64, "calibration": 2, "evaluation": 4},
                    search={"budgets": [5.0], "points": points})
    spec.update(formats=formats, tracking={"enabled": False})
    (out.parent / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(out.parent / "job.yaml")])
    return out


@pytest.fixture(scope="module")
def moe_job(tiny_mixtral, text_dir, tmp_path_factory):
    """A llama.cpp-target job on the tiny Mixtral."""
    return _moe_job(tiny_mixtral, text_dir, tmp_path_factory.mktemp("moe-job") / "out", {"target": "llamacpp"}, 2)


def test_an_moe_job_searches_its_experts_and_llamacpp_builds_them_byte_for_byte(moe_job, capsys):
    from bitalloc.cli import main
    from bitalloc.results import read_config
    from conftest import front_of

    front = front_of(moe_job)
    config = read_config(moe_job / front.mixed[0].config)
    experts = {n: s for n, s in config.shapes.items() if len(s) == 3}
    assert len(experts) == 6 and all(s[0] == 4 for s in experts.values())
    main(["verify", str(moe_job), "--point", "1", "--runtime", "llamacpp"])
    (built,) = [r for r in front_of(moe_job).runtime_points if r.runtime == "llamacpp"]
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert built.details["layers_matching"] == len([f for f in config.formats().values() if f.quantized])
    for argv in (["export", str(moe_job), "--point", "1", "--format", "hqq", "-o", str(moe_job.parent / "hqq.py")],
                 ["build", str(moe_job), "--point", "1", "--runtime", "hqq", "-o", str(moe_job.parent / "hqq")]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:  # HQQ quantizes nn.Linear only: it names the runtimes that store them
            main(argv)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "\n" not in err and "nn.Linear" in err and "bitalloc, gptqmodel" in err
    assert not (moe_job.parent / "hqq").exists()


def test_llmcompressor_quantizes_every_expert_as_the_front_measured(tiny_mixtral, text_dir, tmp_path):
    """An llm-compressor-target job (compressed-tensors' integer grid) on the Mixtral: its recipe targets every
    expert's projection as llm-compressor names them once it linearizes the experts, ties each block's gate, up and
    down (vLLM's fused MoE runs one scheme per layer), and the checkpoint llm-compressor writes decompresses to the
    job's levels, expert by expert, at the bytes counted (compressed-tensors' 16-byte shape per module included)."""
    from bitalloc.cli import main
    from bitalloc.results import read_config
    from bitalloc.runtimes.python import ROOT
    from conftest import front_of

    if not (os.environ.get("BITALLOC_RUNTIMES_PYTHON") or (ROOT / ".venv-runtimes" / "bin" / "python").exists()):
        pytest.skip("no .venv-runtimes (`./dev test` builds it): the Python runtimes are not installed")
    out = _moe_job(tiny_mixtral, text_dir, tmp_path / "out", {"target": "llmcompressor", "method": "rtn-int"}, 1)
    main(["export", str(out), "--point", "1", "--format", "llmcompressor", "-o", str(tmp_path / "recipe.yaml")])
    assert r"mlp\.experts\.\d+\.gate_proj" in (tmp_path / "recipe.yaml").read_text()
    main(["verify", str(out), "--point", "1", "--runtime", "llmcompressor", "--recipe"])
    (built,) = front_of(out).runtime_points
    doc = read_config(out / built.config)
    formats = doc.formats()
    assert all(formats[n].quantized for n, s in doc.shapes.items() if len(s) == 3)
    for block in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts"):
        assert len({formats[f"{block}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")}) == 1
    assert built.details["layers_matching"] == sum(f.quantized for f in formats.values())
    assert built.details["weight_max_rel_diff"] <= 2 ** -10
    assert built.stored_layer_bytes == built.counted_layer_bytes
    # weights equal up to float16 rounding (above) move a KL of 1e-5 by a few 1e-8 (0.3 % with compressed-tensors 0.19)
    assert abs(built.loss - built.bitalloc_loss) <= 1e-2 * built.bitalloc_loss + 1e-9


@pytest.mark.parametrize("runtime, formats, saved, absent", [
    # transformers saves Mixtral's up projection per expert as block_sparse_moe.experts.N.w3 (what vLLM reads);
    # compressed-tensors packs rows as bitalloc does
    ("llmcompressor", {"target": "llmcompressor", "method": "rtn-int"},
     lambda w, e, rows: w[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight_packed"], "model.layers.1.mlp."),
    # GPTQModel's defuser splits the fused experts into mlp.experts.N.up_proj Linear modules; GPTQ packs columns
    ("gptqmodel", {"target": "gptqmodel"}, lambda w, e, rows: w[f"model.layers.1.mlp.experts.{e}.up_proj.qweight"].T,
     "model.layers.1.block_sparse_moe."),
    # bitalloc's QuantExperts: one packed tensor per projection, its experts' rows stacked as the level stacks them
    ("bitalloc", {"target": "bitalloc"},
     lambda w, e, rows: w["model.layers.1.mlp.experts.up_proj.qweight"][e * rows:(e + 1) * rows],
     "model.layers.1.block_sparse_moe."),
])
def test_a_checkpoint_runtimes_artifact_saves_every_expert_as_its_loader_names_it(runtime, formats, saved, absent,
                                                                                   tiny_mixtral, text_dir, tmp_path):
    """`build` on a Mixtral writes each expert's levels under the names the runtime's loader reads (llm-compressor:
    transformers' saved names, its config groups targeting both those and the modules' names; GPTQModel: its
    defused modules', its `dynamic` rules selecting every expert; bitalloc: its `QuantExperts`' packed projections);
    the runtime's own code reads every expert back as the job's level, at the bytes counted, and the front's bytes
    are the folder's."""
    from safetensors import safe_open

    from bitalloc.cli import main
    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import load_spec
    from bitalloc.progress import Stages
    from bitalloc.results import read_config
    from bitalloc.runtimes import get_runtime
    from bitalloc.runtimes.folder import point_bytes
    from bitalloc.runtimes.python import ROOT
    from conftest import front_of

    python = get_runtime(runtime).library is not None
    if python and not (os.environ.get("BITALLOC_RUNTIMES_PYTHON") or (ROOT / ".venv-runtimes" / "bin" / "python").exists()):
        pytest.skip("no .venv-runtimes (`./dev test` builds it): the Python runtimes are not installed")
    out = _moe_job(tiny_mixtral, text_dir, tmp_path / "out", formats, 1)
    artifact = tmp_path / "artifact"
    main(["build", str(out), "--point", "1", "--runtime", runtime, "-o", str(artifact)])
    point = front_of(out).mixed[0]
    doc = read_config(out / point.config)
    ws = open_workspace(load_spec(out / "spec.yaml"), Stages())
    with safe_open(str(artifact / "model.safetensors"), "pt") as fh:
        written = {k: fh.get_tensor(k) for k in fh.keys()}
    unit, fmt = "model.layers.1.mlp.experts.up_proj", doc.formats()["model.layers.1.mlp.experts.up_proj"]
    level, rows = ws.levels.read(unit, fmt), doc.shapes[unit][1]
    for e in range(4):
        assert saved(written, e, rows).equal(level.qweight[e * rows:(e + 1) * rows])
    if python:  # vLLM's fused MoE: one scheme per block
        for block in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts"):
            assert len({doc.formats()[f"{block}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")}) == 1
    assert not any(k.startswith(absent) or k.endswith("experts.gate_up_proj") for k in written)
    main(["verify", str(out), "--point", "1", "--runtime", runtime])
    (built,) = front_of(out).runtime_points
    assert not python or built.details["artifact"] == 1  # measured on the artifact, not the recipe's re-quantization
    assert built.details["layers_matching"] == sum(f.quantized for f in doc.formats().values())
    assert built.details["weight_max_rel_diff"] <= 2 ** -10
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert abs(built.loss - built.bitalloc_loss) <= 1e-2 * built.bitalloc_loss + 1e-9
    folder = sum(p.stat().st_size for p in artifact.iterdir() if p.name != "README.md")
    assert front_of(out).model.bytes_of == runtime and abs(point.bytes - folder) <= 1e-4 * folder
    if python:  # the checkpoint's count is exact; bitalloc's stands in for the card's figures by their width
        assert point_bytes(get_runtime(runtime), ws, doc.formats())[0] == folder


def test_a_job_whose_target_cannot_store_experts_refuses_before_quantizing(tiny_mixtral, text_dir, tmp_path, capsys):
    """HQQ's loader quantizes nn.Linear only: a job targeting it on an MoE is refused in one line, naming the targets
    that store experts and model.exclude, before any level is made."""
    import yaml

    from bitalloc.cli import main
    from conftest import tiny_job

    spec = tiny_job(tiny_mixtral, text_dir, tmp_path / "out", tracking={"enabled": False})
    spec["formats"] = {"target": "hqq"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["run", str(tmp_path / "job.yaml")])
    out = capsys.readouterr().err
    err = out.strip().splitlines()[-1]  # after the note that HQQ keeps the token embedding in float
    assert stop.value.code == 2 and "Traceback" not in out and err.startswith("error: formats.target: ")
    assert "nn.Linear" in err and "bitalloc, gptqmodel" in err and "model.exclude" in err
    assert not (tmp_path / "out").exists()


def test_a_job_on_a_model_mostly_outside_the_search_refuses_in_one_line():
    from bitalloc.pipeline import check_coverage
    from bitalloc.errors import BitallocError

    model = from_module(Unknown())
    with pytest.raises(BitallocError) as refused:
        check_coverage(model, list_layers(model), allow_partial=False)
    assert refused.value.field == "model.source" and "mix (" in refused.value.message
    assert "allow_partial" in refused.value.message
    check_coverage(model, list_layers(model), allow_partial=True)


def test_gptq_quantizes_each_expert_against_its_routed_hessian_and_falls_back_without_tokens():
    model = _model("qwen3_moe")  # 8 experts, top-2: with one short sequence some experts see few tokens
    layers = [l for l in list_layers(model) if l.experts][:3]
    tokens = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(5))
    gptq = get_quantizer("gptq")
    fmt = Format(4, 32, False, method="gptq")
    levels = filled_levels(model, layers, (fmt,), {"gptq": gptq}, Calibration(tokens, "test"))
    few, experts = gptq.data_free
    assert 0 < few < experts  # some experts fell back, some did not
    for layer in layers:
        level = levels.read(layer.name, fmt)
        assert level.out_features == layer.row_count and torch.isfinite(level.scales).all()


def test_hawq_top_eigenvalue_of_a_fused_gate_is_its_own_rows():
    from transformers import MixtralConfig, MixtralForCausalLM

    from bitalloc.sensitivity import EstimatorContext, get_estimator

    torch.manual_seed(0)
    model = from_module(MixtralForCausalLM(MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=2, max_position_embeddings=32)))
    layers = list_layers(model)
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    hawq = get_estimator("hawq", top_eigenvalue=True, power_iters=300)
    module = model.module
    named = {k: v.detach() for k, v in module.named_parameters()}
    found = {}
    for proj in ("gate_proj", "up_proj"):
        layer = next(l for l in layers if l.name.endswith(f"experts.{proj}"))
        ctx = EstimatorContext(model, [layer], (W2,), filled_levels(model, [layer], (W2,)), tokens, "t", 0)
        found[proj] = hawq._top_eigenvalue(ctx, layer, tokens)
        key = f"{layer.module_name}.{layer.param}"
        base = named[key]

        start, step = layer.rows
        index = torch.arange(start, start + step * layer.out_features, step)

        def loss(rows):
            w = base.index_copy(-2, index, rows)
            logits = torch.func.functional_call(module, {**named, key: w}, (tokens,)).logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

        rows = model.view(layer, base).contiguous()
        h = torch.autograd.functional.hessian(loss, rows).reshape(rows.numel(), -1)  # _grouped_mm has no forward AD
        eig = torch.linalg.eigvalsh(h)
        assert found[proj] == pytest.approx(float(eig[eig.abs().argmax()]), rel=0.05)
    assert found["gate_proj"] != pytest.approx(found["up_proj"], rel=0.01)  # each its own rows, not the joint block


def test_a_checkpoint_whose_experts_fuse_at_load_is_not_kept_mapped(text_dir, tmp_path):
    """Per-expert tensors are copied into fused experts at load; the few left pointing into the file are copied out
    too, so the file's pages read while loading are not held beside their copies, and a tied head stays tied."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from bitalloc.model import load_model
    from conftest import _tokenizer

    torch.manual_seed(0)  # experts hold most of the file, as in the MoE models people deploy
    tokenizer = _tokenizer((text_dir / "part0.txt").read_text())
    MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, tie_word_embeddings=True)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert str(tmp_path / "model.safetensors") not in Path("/proc/self/maps").read_text()
    assert model.module.lm_head.weight is model.module.model.embed_tokens.weight
