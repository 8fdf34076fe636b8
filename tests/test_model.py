import pytest

from bitalloc.errors import BitallocError
from bitalloc.model import list_layers, load_model, other_bytes, select_layers


def test_llama_layers_and_tied_head(tiny_llama):
    """The token embedding is a unit [vocab, hidden] naming the head tied to it; the head, the same tensor, is listed
    as tied and never chosen: the tensor is one unit, counted once."""
    model = load_model(str(tiny_llama))
    layers = list_layers(model)
    assert len(layers) == 1 + 2 * 7 + 1
    embed, head = layers[0], layers[-1]
    assert (embed.name, embed.embedding, embed.head, embed.shape) == ("model.embed_tokens", True, "lm_head", (96, 48))
    assert head.name == "lm_head" and head.tied_to == "model.embed_tokens"
    q = layers[1]
    assert (q.name, q.out_features, q.in_features, q.transposed) == ("model.layers.0.self_attn.q_proj", 48, 48, False)
    chosen = [l.name for l in select_layers(layers)]
    assert "lm_head" not in chosen and chosen[0] == "model.embed_tokens" and len(chosen) == 15
    assert "model.embed_tokens" not in [l.name for l in select_layers(layers, embeddings=False)]
    assert other_bytes(model, select_layers(layers)) == other_bytes(model, select_layers(layers, embeddings=False)) \
        - 4 * embed.numel


def test_other_bytes_counts_shared_weights_once(tiny_llama):
    model = load_model(str(tiny_llama))
    chosen = select_layers(list_layers(model))
    chosen_params = sum(l.numel for l in chosen)
    distinct = {p.data_ptr(): p for p in model.module.parameters()}.values()
    total = sum(p.numel() * p.element_size() for p in distinct)
    total += sum(b.numel() * b.element_size() for b in model.module.buffers())
    assert other_bytes(model, chosen) == total - 4 * chosen_params


def test_gpt2_conv1d_is_transposed(tiny_gpt2):
    model = load_model(str(tiny_gpt2))
    layers = {l.name: l for l in list_layers(model)}
    attn = layers["transformer.h.0.attn.c_attn"]
    assert attn.transposed and (attn.in_features, attn.out_features) == (32, 96)
    assert tuple(model.weight(attn).shape) == (96, 32)
    assert layers["lm_head"].tied_to == "transformer.wte" and layers["transformer.wte"].head == "lm_head"
    assert "transformer.wpe" not in layers  # position embeddings are not looked up by token


def test_include_exclude_patterns(tiny_llama):
    layers = list_layers(load_model(str(tiny_llama)))
    mlp = select_layers(layers, include=[r"\.mlp\."])
    assert len(mlp) == 6 and all(".mlp." in l.name for l in mlp)
    no_down = select_layers(layers, exclude=["down_proj"])
    assert len(no_down) == 13  # the embedding with the 12 others


@pytest.mark.parametrize("kwargs, field", [
    ({"include": ["nothing_like_this"]}, "model.include[0]"),
    ({"exclude": ["q_proj", "zzz"]}, "model.exclude[1]"),
    ({"include": ["("]}, "model.include[0]"),
])
def test_bad_patterns_are_named(tiny_llama, kwargs, field):
    layers = list_layers(load_model(str(tiny_llama)))
    with pytest.raises(BitallocError) as exc:
        select_layers(layers, **kwargs)
    assert exc.value.field == field


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(BitallocError) as exc:
        load_model(str(tmp_path / "missing.gguf"))
    assert exc.value.field == "model.source"
    with pytest.raises(BitallocError) as exc:
        load_model(str(tmp_path))
    assert exc.value.field == "model.source"
