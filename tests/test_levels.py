"""The level store (levels quantized once, kept on disk in their stored form, reused) and streamed evaluation."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.evaluate import Evaluator
from bitalloc.formats import Format
from bitalloc.kernels.rtn import fake_quantize
from helpers import filled_levels
from bitalloc.quantizers.store import LevelStore, Levels, dense_bytes
from bitalloc.model import list_layers, load_model, select_layers
from bitalloc.quantizers import get_quantizer

FORMATS = (Format(2, 32), Format(3, 32, True), Format(5, 16), Format(8, 32), Format(16))


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def model_layers(request, tmp_path_factory):
    model = load_model(str(request.getfixturevalue(request.param)))
    layers = select_layers(list_layers(model))
    store = LevelStore(model.content_hash(), get_quantizer("rtn"), root=tmp_path_factory.mktemp("levels"))
    return model, layers, store


def test_a_level_read_back_is_what_the_quantizer_made(model_layers):
    model, layers, store = model_layers
    store.fill(model, layers, FORMATS)
    rtn = get_quantizer("rtn")
    for layer in layers:
        for fmt in FORMATS[:-1]:
            made, read = rtn.quantize(model.weight(layer), fmt), store.read(layer.name, fmt)
            assert torch.equal(made.qweight, read.qweight) and torch.equal(made.scales, read.scales)
            assert (made.zeros is None) == (read.zeros is None) and (made.zeros is None or torch.equal(made.zeros, read.zeros))
            assert read.in_features == layer.in_features and read.fmt == fmt
    assert not (store.folder / "fp16").exists()  # 16-bit levels are the weight cast, never stored


def test_a_second_fill_reuses_every_level_and_writes_nothing(model_layers):
    model, layers, store = model_layers
    store.fill(model, layers, FORMATS)
    files = {p: p.stat().st_mtime_ns for p in store.folder.rglob("*.safetensors")}
    assert store.fill(model, layers, FORMATS) == (0, len(layers) * 4)
    assert {p: p.stat().st_mtime_ns for p in store.folder.rglob("*.safetensors")} == files
    # another quantizer setting, or another model, keys other files
    other = LevelStore("sha256:" + "0" * 64, get_quantizer("rtn"), root=store.folder.parents[1])
    assert other.folder != store.folder and other.fill(model, layers[:1], FORMATS[:1]) == (1, 0)


def test_streamed_evaluation_equals_weights_quantized_in_memory(model_layers):
    """What the former all-in-memory cache measured, whatever the working set's size (even one that keeps nothing)."""
    model, layers, store = model_layers
    store.fill(model, layers, FORMATS)
    tokens = torch.randint(0, 90, (3, 24), generator=torch.Generator().manual_seed(1))
    assignment = {l.name: FORMATS[i % len(FORMATS)] for i, l in enumerate(layers)}
    in_memory = {}
    for l in layers:
        q = fake_quantize(model.weight(l), assignment[l.name])
        in_memory[l.name] = q.t().contiguous() if l.transposed else q
    before = {n: p.clone() for n, p in model.module.named_parameters()}
    expected = Evaluator(model, Levels(model, layers, FORMATS, {'rtn': store}), tokens, 2).evaluate_tensors(in_memory)
    largest = max(l.numel for l in layers) * 4
    for working_set in (None, dense_bytes(model, layers), largest, 1):
        levels = Levels(model, layers, FORMATS, {'rtn': store}, working_set=working_set)
        assert Evaluator(model, levels, tokens, 2).evaluate(assignment) == expected
        assert working_set is None or levels.held_bytes <= working_set
    for n, p in model.module.named_parameters():
        assert torch.equal(p, before[n]), n


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4)), min_size=1, max_size=40), st.integers(1, 40000))
def test_the_working_set_never_holds_more_than_its_bound(tiny_llama, accesses, bound):
    model = load_model(str(tiny_llama))
    layers = select_layers(list_layers(model))[:6]
    levels = filled_levels(model, layers, FORMATS, working_set=bound)
    for i, j in accesses:
        w = levels.weight(layers[i % len(layers)].name, FORMATS[j])
        assert w.dtype == model.layer_module(layers[i % len(layers)].name).weight.dtype
        assert levels.held_bytes <= bound


def test_a_store_that_cannot_fit_on_disk_is_refused_before_writing(model_layers, monkeypatch, tmp_path):
    model, layers, _ = model_layers
    store = LevelStore("sha256:" + "1" * 64, get_quantizer("rtn"), root=tmp_path)
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: free._replace(free=1000))
    with pytest.raises(BitallocError) as exc:
        store.fill(model, layers, FORMATS)
    assert exc.value.field == "BITALLOC_CACHE" and "MiB free" in str(exc.value)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_second_job_on_the_same_model_reuses_its_levels(tiny_llama, text_dir, tmp_path, monkeypatch, capsys):
    import yaml

    from bitalloc.cli import main
    from conftest import front_of, tiny_job

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    fronts = []
    for run in ("first", "second"):
        spec = tmp_path / f"{run}.yaml"
        spec.write_text(yaml.safe_dump(tiny_job(tiny_llama, text_dir, tmp_path / run)))
        main(["run", str(spec)])
        fronts.append([(p.label, p.bytes, p.loss) for p in front_of(tmp_path / run).points])
        err = capsys.readouterr().err
        announced = [line for line in err.splitlines() if line.startswith("levels (rtn):")]
        assert announced == ([] if run == "first" else [announced[0]]), err
    assert announced[0].startswith("levels (rtn): 60 reused, 0 made, ") and str(tmp_path / "cache") in announced[0]
    assert fronts[0] == fronts[1]


def test_a_job_with_a_float16_reference_reports_each_kl_with_its_bound(tiny_llama, text_dir, tmp_path, capsys):
    import yaml

    from bitalloc.cli import main
    from conftest import front_of, tiny_job

    fronts = {}
    for precision in ("float32", "float16"):
        spec = tmp_path / f"{precision}.yaml"
        spec.write_text(yaml.safe_dump(tiny_job(tiny_llama, text_dir, tmp_path / precision,
                                                data={"reference": precision})))
        main(["run", str(spec)])
        fronts[precision] = front_of(tmp_path / precision)
    capsys.readouterr()
    exact, half = fronts["float32"], fronts["float16"]
    assert (exact.reference.precision, half.reference.precision) == ("float32", "float16")
    assert half.memory.reference_bytes * 2 == exact.memory.reference_bytes
    assert half.reference.quality == exact.reference.quality
    for a, b in zip(exact.points, half.points):
        assert a.label == b.label and a.loss_error is None and b.loss_error > 0
        assert abs(a.loss - b.loss) <= b.loss_error and a.quality == b.quality


def test_a_damaged_level_file_is_a_one_line_error_naming_it(model_layers, tmp_path):
    model, layers, _ = model_layers
    store = LevelStore("sha256:" + "2" * 64, get_quantizer("rtn"), root=tmp_path)
    store.fill(model, layers[:1], FORMATS[:1])
    path = store.path(layers[0].name, FORMATS[0])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BitallocError) as exc:
        store.read(layers[0].name, FORMATS[0])
    assert exc.value.field == "BITALLOC_CACHE" and str(path) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("method", ["rtn", "clip", "gptq"])
def test_an_untied_embedding_level_is_each_row_quantized_alone(tiny_llama, method):
    """A lookup dequantizes one token's row: an untied embedding's level (no input moments: every column alike) is
    each row quantized by itself, so a row means the same whichever rows were quantized with it."""
    from bitalloc.kernels.packed import dequantize_packed
    from bitalloc.model import from_module
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = from_module(LlamaForCausalLM(config))
    embed = list_layers(model)[0]
    assert embed.embedding and embed.head is None
    quantizer, fmt = get_quantizer(method), Format(3, 16, method=method)
    w = model.weight(embed)
    whole = dequantize_packed(quantizer.quantize(w, fmt))
    for v in (0, 17, 63):
        assert torch.equal(whole[v], dequantize_packed(quantizer.quantize(w[v:v + 1], fmt))[0]), v
