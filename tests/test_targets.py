"""`formats: {target: NAME}`: only what the runtime stores for each layer's shape is offered, layers the runtime
makes share a format are tied, and whatever the search picks within that exports to the runtime exactly."""

from __future__ import annotations

import random

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.jobs.spec import parse_spec
from bitalloc.model import QuantizableLayer
from bitalloc.runtimes import RUNTIMES, Layer, get_runtime
from bitalloc.runtimes import venv as runtime_code

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
WIDTHS = (32, 48, 64, 96, 128, 192, 256, 320, 576, 768, 1536, 2048, 100)


def _runtime_stores(fmt, width: int) -> bool:
    """The runtime's own rule: whole ggml blocks (gguf-py's block table), whole GPTQ/HQQ groups; bitalloc's packed
    layout takes any width (a shorter last group)."""
    if fmt.ggml:
        return width % GGML_QUANT_SIZES[GGMLQuantizationType[fmt.ggml.upper()]][0] == 0
    return fmt.method in ("rtn", "clip") or width % fmt.group_size == 0


@settings(max_examples=40, deadline=None)
@given(target=st.sampled_from(sorted(RUNTIMES)), widths=st.lists(st.sampled_from(WIDTHS), min_size=7, max_size=7),
       blocks=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_a_target_offers_only_what_its_runtime_stores_and_its_picks_export_exactly(target, widths, blocks, seed,
                                                                                   tmp_path_factory):
    spec = parse_spec({"model": {"source": "x"}, "formats": {"target": target}})
    formats = spec.expand_formats()
    layers = [QuantizableLayer(f"model.layers.{b}.{kind}", width, 64, "float32")
              for b in range(blocks) for kind, width in zip(KINDS, widths)]
    for layer in layers:
        for fmt in formats:
            assert fmt.fits(layer.in_features) == _runtime_stores(fmt, layer.in_features), (fmt.name, layer)
    # a pick of the search: one allowed format per tied group (a group whose members share no format is skipped)
    rng = random.Random(seed)
    groups = spec.target_ties(layers)
    grouped = {i for g in groups for i in g}
    items = [list(g) for g in groups] + [[i] for i in range(len(layers)) if i not in grouped]
    picked = {}
    for members in items:
        choices = [f for f in formats if all(f.fits(layers[i].in_features) for i in members)]
        if choices:
            fmt = rng.choice(choices)
            picked.update({layers[i].name: fmt for i in members})
    chosen = [Layer(l.name, picked[l.name], l.out_features, l.in_features) for l in layers if l.name in picked]
    runtime = get_runtime(target)
    if chosen and runtime.export_file:
        text, _ = runtime.export(chosen, "llama", nearest=False)  # raises where a layer is not expressed exactly
        if runtime_code.available(target):  # the runtime's own parser reads it
            file = tmp_path_factory.mktemp("export") / "export.txt"
            file.write_text(text)
            runtime_code.check(target, str(file))


def test_targets_tie_what_their_runtime_fuses():
    layers = [QuantizableLayer(f"model.layers.{b}.{kind}", 64, 64, "float32") for b in range(2) for kind in KINDS]
    names = lambda groups: sorted(sorted(layers[i].name.split(".", 3)[3] for i in g) for g in groups)  # noqa: E731
    assert names(get_runtime("gptqmodel").ties(layers)) == sorted(
        [sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])] * 2
        + [sorted(["mlp.gate_proj", "mlp.up_proj"])] * 2)
    assert len(get_runtime("hqq").ties(layers)) == len(KINDS)  # one per tag, across blocks
    assert get_runtime("llamacpp").ties(layers) == []


@pytest.mark.parametrize("formats, field", [
    ({"target": "llamacpp", "bits": [4]}, "formats.bits"),
    ({"target": "gptqmodel", "method": "hqq"}, "formats.method"),
    ({"target": "vllm"}, "formats.target"),
    ({"method": "gguf"}, "formats.types"),
    ({"types": ["q4_K"], "method": "gptq"}, "formats.types"),
    ({"types": ["iq2_xxs"]}, "formats.types"),
    ({"types": ["q9_K"]}, "formats.types"),
    ([{"bits": [3], "method": "gptq"}, {"bits": [4], "method": "gptq", "params": {"damp": 0.1}}], "formats[1].params"),
])
def test_bad_formats_name_the_field(formats, field):
    with pytest.raises(BitallocError) as exc:
        parse_spec({"model": {"source": "x"}, "formats": formats})
    assert exc.value.field == field


def test_formats_from_several_quantizers_search_together():
    spec = parse_spec({"model": {"source": "x"}, "formats": [{"bits": [2, 3], "method": "gptq"},
                                                            {"types": ["q4_K", "q8_0"]}, {"bits": [16]}]})
    assert [f.name for f in spec.expand_formats()] == ["w2g64a-gptq", "w3g64a-gptq", "q4_K", "q8_0", "fp16"]
    assert sorted(spec.quantizers()) == ["gguf", "gptq", "rtn"]


def test_a_saved_target_spec_reads_back_as_the_same_job():
    """A job saves its spec (resume, verify read it back): a target entry is saved as the user wrote it, not as the
    formats it expands to, which the target fixes and a spec may not set."""
    from bitalloc import configio

    spec = parse_spec({"model": {"source": "smollm2-135m"},
                       "formats": [{"target": "llamacpp"}, {"bits": [4], "group_size": 64, "method": "clip"}]})
    saved = configio.parse_yaml(configio.dumps(spec.model_dump(mode="json"), ".yaml"), "spec")
    again = parse_spec(saved)
    assert again.expand_formats() == spec.expand_formats() and again.spec_hash() == spec.spec_hash()


def test_a_target_entry_that_also_sets_a_field_is_refused_or_noted(capsys):
    """A value other than the default is refused, naming the field; one equal to it (what specs saved before
    targets were written as given hold) is read, with a one-line note that the target decides it."""
    with pytest.raises(BitallocError) as refused:
        parse_spec({"model": {"source": "x"}, "formats": {"target": "llamacpp", "group_size": 32}})
    assert refused.value.field == "formats.group_size"
    parse_spec({"model": {"source": "x"}, "formats": {"target": "llamacpp", "bits": [2, 3, 4, 5, 6, 8]}})
    assert capsys.readouterr().err == "note: formats.bits: set by target llamacpp; the value given is ignored\n"


def test_an_export_says_when_vllm_cannot_load_what_it_writes():
    """5-bit layers (from a search that was not for these targets): llm-compressor and GPTQModel load them, vLLM
    does not, and the export says so."""
    from bitalloc.formats import Format

    layers = [Layer("model.layers.0.mlp.down_proj", Format(5, 64, False), 64, 128)]
    for name in ("llmcompressor", "gptqmodel"):
        runtime = get_runtime(name)
        runtime.export(layers, "llama", nearest=False)
        assert any("vLLM does not" in line for line in runtime.notes(layers)), name


def test_a_target_that_cannot_store_a_quantized_embedding_never_offers_or_writes_one(capsys):
    """llama.cpp stores `token_embd` at any type and bitalloc's checkpoint packs it row by row; vLLM's methods and
    HQQ keep embeddings at their dtype: their targets leave the embedding out of the search and say why; asking for
    it is one error; an export of a config that quantizes it keeps it only with --nearest, saying so."""
    from bitalloc.formats import Format

    def spec(target, **model):
        return parse_spec({"model": {"source": "x", **model}, "formats": {"target": target}})

    assert spec("llamacpp").embeddings() == spec("bitalloc").embeddings() == (True, "")
    assert parse_spec({"model": {"source": "x"}}).embeddings() == (True, "")
    for target in ("gptqmodel", "llmcompressor", "hqq"):
        searched, why = spec(target).embeddings()
        assert not searched and target in why and "unquantized" in why
        with pytest.raises(BitallocError) as exc:
            spec(target, embeddings=True).embeddings()
        assert exc.value.field == "model.embeddings"
    assert spec("llamacpp", embeddings=False).embeddings() == (False, "")
    parse_spec({"model": {"source": "x", "quantize_tied": True}})  # a spec written before: read, with a note
    assert "model.embeddings" in capsys.readouterr().err
    layers = [Layer("model.embed_tokens", Format(4, 64, True, method="gptq"), 49152, 576, embedding=True),
              Layer("model.layers.0.self_attn.o_proj", Format(4, 64, True, method="gptq"), 576, 576)]
    with pytest.raises(BitallocError) as exc:
        get_runtime("gptqmodel").export(layers, "llama", nearest=False)
    assert "token embedding" in exc.value.message
    text, changed = get_runtime("gptqmodel").export(layers, "llama", nearest=True)
    assert changed == ["model.embed_tokens: w4g64s-gptq -> 16-bit (gptqmodel stores the token embedding unquantized)"]
    assert "embed_tokens" not in text
    gguf = [Layer("model.embed_tokens", Format.of_ggml("q6_K"), 49152, 576, embedding=True)]
    with pytest.raises(BitallocError):  # 576-wide rows do not take q6_K's 256-blocks
        get_runtime("llamacpp").export(gguf, "llama", nearest=False)
    gguf = [Layer("model.embed_tokens", Format.of_ggml("q5_0"), 49152, 576, embedding=True)]
    assert get_runtime("llamacpp").export(gguf, "llama", nearest=False)[0] == "^token_embd\\.weight$=q5_0\n"
