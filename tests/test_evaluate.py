import math

import pytest
import torch

from bitalloc.evaluate import Evaluator
from helpers import filled_levels
from bitalloc.kernels.rtn import fake_quantize
from bitalloc.formats import Format
from bitalloc.model import list_layers, load_model, select_layers


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def setup(request):
    model = load_model(str(request.getfixturevalue(request.param)))
    layers = select_layers(list_layers(model))
    formats = (Format(2, 32), Format(4, 32), Format(8, 32), Format(16))
    tokens = torch.randint(0, 90, (4, 32), generator=torch.Generator().manual_seed(0))
    levels = filled_levels(model, layers, formats)
    return model, layers, formats, levels, Evaluator(model, levels, tokens, batch_size=3)


def _uniform(layers, fmt):
    return {l.name: fmt for l in layers}


def test_kl_orders_with_bits_and_sixteen_bit_is_near_zero(setup):
    _, layers, formats, _, ev = setup
    kls = [ev.evaluate(_uniform(layers, f)).loss for f in formats]
    assert kls[3] < 1e-5
    assert kls[0] > kls[1] > kls[2] > kls[3]
    assert ev.fp.loss == 0 and ev.fp.tokens == 128


def test_weights_are_restored_and_streamed_levels_equal_quantizing_now(setup):
    model, layers, formats, levels, ev = setup
    before = {n: p.clone() for n, p in model.module.named_parameters()}
    m1 = ev.evaluate(_uniform(layers, formats[0]))
    for n, p in model.module.named_parameters():
        assert torch.equal(p, before[n]), n
    now = {l.name: fake_quantize(model.weight(l), formats[0]) for l in layers}
    now = {l.name: now[l.name].t().contiguous() if l.transposed else now[l.name] for l in layers}
    other = Evaluator(model, levels, torch.cat(ev.batches), batch_size=3)
    assert other.evaluate_tensors(now) == m1


def test_level_store_size_is_the_counted_bytes(setup):
    from bitalloc.formats import weight_bytes

    _, layers, formats, levels, _ = setup
    assert levels.nbytes == sum(weight_bytes(l.out_features, l.in_features, f) for l in layers for f in formats
                                if f.quantized)
    files = [levels.stores['rtn'].path(l.name, f) for l in layers for f in formats if f.quantized]
    on_disk = sum(p.stat().st_size for p in files)
    assert levels.nbytes < on_disk < levels.nbytes + 2048 * len(files)  # data plus each file's header


def test_plain_torch_module():
    from bitalloc.model import from_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(50, 40), torch.nn.Linear(40, 64), torch.nn.GELU(), torch.nn.Linear(64, 50))
    model = from_module(net)
    layers = select_layers(list_layers(model))
    assert [l.name for l in layers] == ["1", "3"]
    formats = (Format(2, 16), Format(8, 16))
    ev = Evaluator(model, filled_levels(model, layers, formats), torch.randint(0, 50, (2, 10)), batch_size=2)
    assert ev.evaluate(_uniform(layers, formats[0])).loss > ev.evaluate(_uniform(layers, formats[1])).loss > 0


def test_a_float16_reference_keeps_half_and_every_kl_within_its_stated_bound(setup):
    """Each measured KL against the float16 reference is within the bound it reports of the KL against float32;
    the FP model's own measurement is unchanged."""
    model, layers, formats, levels, exact = setup
    half = Evaluator(model, levels, torch.cat(exact.batches), batch_size=3, reference="float16")
    assert half.reference_nbytes * 2 == exact.reference_nbytes
    assert half.fp == exact.fp
    g = torch.Generator().manual_seed(3)
    configs = [_uniform(layers, f) for f in formats] + [
        {l.name: formats[int(i)] for l, i in zip(layers, torch.randint(0, len(formats), (len(layers),), generator=g))}
        for _ in range(4)]
    for config in configs:
        a, b = exact.evaluate(config), half.evaluate(config)
        # the bound is about 2^-11 x the reference's entropy per token, whatever the config
        assert a.loss_error == 0 and 0 < b.loss_error < 2**-11 * math.log(model.module.config.vocab_size) * 1.1
        assert abs(b.loss - a.loss) <= b.loss_error
        assert b.quality == a.quality


def test_a_tied_embedding_is_measured_at_both_its_uses(setup):
    """The tied embedding unit is one tensor for the lookup and the logits: its measurement is the model with both
    replaced, unlike replacing the lookup alone; its bytes are counted once."""
    from bitalloc.model import other_bytes

    model, layers, formats, levels, ev = setup
    embed = layers[0]
    assert embed.embedding and embed.head is not None and not any(l.tied_to for l in layers)
    got = ev.evaluate({embed.name: formats[0]})
    dequantized = levels.weight(embed.name, formats[0])
    lookup, head = model.layer_module(embed.name), model.layer_module(embed.head)
    assert lookup.weight is head.weight
    original = lookup.weight
    try:
        lookup.weight = torch.nn.Parameter(dequantized, requires_grad=False)
        lookup_only = ev._measure_outputs()
        head.weight = lookup.weight
        both = ev._measure_outputs()
    finally:
        lookup.weight = head.weight = original
    assert got.loss == pytest.approx(both.loss, rel=1e-6) and abs(got.loss - lookup_only.loss) > 1e-3 * got.loss
    assert other_bytes(model, layers) == other_bytes(model, layers[1:]) - 4 * embed.numel  # one float32 tensor
