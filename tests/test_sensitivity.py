"""Estimators against exact values (torch.func.hessian), hand computations and planted slopes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

from bitalloc.errors import BitallocError
from bitalloc.evaluate import Evaluator
from helpers import filled_levels
from bitalloc.formats import Format
from bitalloc.model import from_module, list_layers, select_layers
from bitalloc.sensitivity import EstimatorContext, get_estimator, run_estimator
from bitalloc.sensitivity.linearity import fit_through_origin
from bitalloc.types import SensitivityTable

FORMATS = (Format(2, 8), Format(4, 8), Format(8, 8))


def _micro_llama(seed=0, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager",
                      initializer_range=0.3, tie_word_embeddings=tied)
    return from_module(LlamaForCausalLM(cfg), "micro-llama")


@pytest.fixture(scope="module")
def ctx():
    model = _micro_llama()
    layers = select_layers(list_layers(model))
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    return EstimatorContext(model, layers, FORMATS, filled_levels(model, layers, FORMATS), tokens, "sha256:test", seed=0)


def _mean_loss(model, params, tokens):
    logits = functional_call(model.module, params, (tokens,)).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_hutchinson_traces_match_exact_hessian_traces(ctx):
    hawq = get_estimator("hawq", tol=0.0, min_probes=600, max_probes=600, probes_per_batch=6)
    samples = hawq.trace_samples(ctx, ctx.calibration, np.ones(len(ctx.layers)))
    est, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(len(samples))
    named = dict(ctx.model.module.named_parameters())
    for i, layer in enumerate(ctx.layers):
        key = f"{layer.name}.weight"

        def loss(w, key=key):
            return _mean_loss(ctx.model, {**named, key: w}, ctx.calibration)

        exact = float(torch.diagonal(hessian(loss)(named[key].detach()).reshape(named[key].numel(), -1)).sum())
        assert abs(est[i] - exact) <= 4 * se[i] + 1e-6, (layer.name, est[i], exact, se[i])


def test_one_pass_equals_per_layer_passes(ctx):
    hawq = get_estimator("hawq", tol=0.0, min_probes=300, max_probes=300)
    joint = hawq.trace_samples(ctx, ctx.calibration, np.ones(len(ctx.layers)))
    for i, layer in enumerate(ctx.layers[:4]):
        one = EstimatorContext(ctx.model, [layer], ctx.formats, ctx.levels, ctx.calibration, ctx.data_hash, seed=7)
        alone = hawq.trace_samples(one, ctx.calibration, np.ones(1))[:, 0]
        se = np.hypot(joint[:, i].std(ddof=1), alone.std(ddof=1)) / np.sqrt(300)
        assert abs(joint[:, i].mean() - alone.mean()) <= 4 * se, layer.name


def test_hawq_table_has_uncertainty_and_stops_on_tolerance(ctx):
    table = run_estimator(get_estimator("hawq", tol=0.5, min_probes=4, max_probes=64), ctx)
    assert table.params["probes"] < 64
    assert table.uncertainty.shape == table.values.shape
    assert (table.values[:, 0] >= table.values[:, 2]).all()


def test_peak_rss_sees_memory_held_only_inside_the_block():
    """What tables report as an estimator's peak memory: a 200 MB tensor held for a moment is seen."""
    import time

    from bitalloc.profiling import PeakRSS, resident_bytes

    before = resident_bytes()
    with PeakRSS() as peak:
        held = torch.ones(50_000_000)
        time.sleep(0.1)
        del held
    assert peak.bytes - before >= 150e6


@pytest.mark.parametrize("labels", ["data", "model"])
def test_weight_fisher_equals_hand_computation(ctx, labels):
    table = run_estimator(get_estimator("fisher", side="weight", labels=labels), ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    params = [ctx.model.layer_module(l.name).weight for l in ctx.layers]
    fisher = [torch.zeros_like(p) for p in params]
    for p in params:
        p.requires_grad_(True)
    n = 0
    for seq in ctx.calibration.split(1):
        logits = ctx.model.module(seq).logits[:, :-1].float()
        if labels == "data":
            target = seq[:, 1:]
        else:
            probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1])
            target = torch.multinomial(probs, 1, generator=gen).reshape(1, -1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        for f, g in zip(fisher, torch.autograd.grad(loss, params)):
            f += g.pow(2)
        n += target.numel()
    for p in params:
        p.requires_grad_(False)
    for i, layer in enumerate(ctx.layers):
        for j, fmt in enumerate(FORMATS):
            expected = 0.5 * float((fisher[i] / n * ctx.delta(layer, fmt).pow(2)).sum())
            assert table.values[i, j] == pytest.approx(expected, rel=1e-5)


def test_output_fisher_equals_hand_computation(ctx):
    table = run_estimator(get_estimator("fisher", side="output"), ctx)
    assert ctx.layers[0].embedding
    layer = ctx.layers[1]
    module = ctx.model.layer_module(layer.name)
    captured = {}

    def hook(_m, args, out):
        captured["x"] = args[0].detach()
        out.retain_grad()
        captured["y"] = out

    total = np.zeros(len(FORMATS))
    n = 0
    module.weight.requires_grad_(True)
    handle = module.register_forward_hook(hook)
    for seq in ctx.calibration.split(1):
        logits = ctx.model.module(seq).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), reduction="sum").backward()
        g2 = captured["y"].grad.pow(2)
        for j, fmt in enumerate(FORMATS):
            total[j] += float((g2 * (captured["x"] @ ctx.delta(layer, fmt).t()).pow(2)).sum())
        n += seq.shape[1] - 1
    handle.remove()
    module.weight.requires_grad_(False)
    module.weight.grad = None
    assert table.values[1] == pytest.approx(0.5 * total / n, rel=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_output_fisher_of_the_embedding_counts_its_lookups_and_a_tied_head(tied):
    """The embedding's output is its looked-up rows (ΔyT = ΔW[id]); tied, the head's output term is added."""
    model = _micro_llama(tied=tied)
    layers = select_layers(list_layers(model))
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    c = EstimatorContext(model, layers, FORMATS, filled_levels(model, layers, FORMATS), tokens, "sha256:test", seed=0)
    embed = layers[0]
    assert embed.embedding and (embed.head == "lm_head") == tied and ("lm_head" in [l.name for l in layers]) != tied
    table = run_estimator(get_estimator("fisher", side="output"), c)
    weight, head = model.layer_module(embed.name).weight, model.layer_module("lm_head")
    captured = {}

    def keep(key):
        def hook(_m, args, out):
            out.retain_grad()
            captured[key] = (args[0].detach(), out)
        return hook

    total, n = np.zeros(len(FORMATS)), 0
    weight.requires_grad_(True)
    handles = [model.layer_module(embed.name).register_forward_hook(keep("lookup")),
               head.register_forward_hook(keep("head"))]
    for seq in tokens.split(1):
        logits = model.module(seq).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), reduction="sum").backward()
        ids, y = captured["lookup"]
        x, logit = captured["head"]
        for j, fmt in enumerate(FORMATS):
            d = c.delta(embed, fmt)
            total[j] += float((y.grad.pow(2) * d[ids].pow(2)).sum())
            if tied:
                total[j] += float((logit.grad.pow(2) * (x @ d.t()).pow(2)).sum())
        n += seq.shape[1] - 1
    for h in handles:
        h.remove()
    weight.requires_grad_(False)
    weight.grad = None
    assert table.values[0] == pytest.approx(0.5 * total / n, rel=1e-5)


def test_activation_sqnr_equals_hand_computation(ctx):
    table = run_estimator(get_estimator("sqnr", activations=True), ctx)
    layer = ctx.layers[-1]
    xs = []
    handle = ctx.model.layer_module(layer.name).register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for seq in ctx.calibration.split(1):
            ctx.model.module(seq)
    handle.remove()
    x = torch.cat(xs)
    w = ctx.model.weight(layer)
    for j, fmt in enumerate(FORMATS):
        expected = float((x @ ctx.delta(layer, fmt).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())
        assert table.values[-1, j] == pytest.approx(expected, rel=1e-4)
    data_free = run_estimator(get_estimator("sqnr"), ctx)
    assert data_free.data_hash is None and table.data_hash == "sha256:test"


def test_linearity_fit_recovers_a_planted_slope():
    rng = np.random.default_rng(0)
    t = np.array([0.01, 0.02, 0.05, 0.1])
    y = 3.7 * t + rng.normal(0, 0.002, len(t))
    alpha, stderr, r2 = fit_through_origin(t, y)
    assert abs(alpha - 3.7) <= 4 * stderr and r2 > 0.99


def test_linearity_on_a_model_fits_well(ctx):
    table = run_estimator(get_estimator("linearity", levels=3), ctx)
    alpha, r2 = np.array(table.params["alpha"]), np.array(table.params["fit_r2"])
    assert len(alpha) == len(ctx.layers)
    # random-init attention is near uniform, so q/k barely move the output; every layer with signal fits a line
    signal = alpha > 1e-3 * alpha.max()
    assert signal.sum() >= 4 and (r2[signal] > 0.99).all()
    assert (table.values[signal, 0] > table.values[signal, 2]).all()


def test_measured_is_single_layer_kl(ctx):
    table = run_estimator(get_estimator("measured"), ctx)
    ev = Evaluator(ctx.model, ctx.levels, ctx.calibration)
    assert table.values[3, 0] == ev.evaluate({ctx.layers[3].name: FORMATS[0]}).loss
    assert (table.values[:, 0] > table.values[:, 2]).all()


def test_non_finite_values_are_refused_with_the_layer_named():
    with pytest.raises(BitallocError) as exc:
        SensitivityTable(("a", "b"), FORMATS[:1], np.array([[0.1], [np.nan]]), "hawq")
    assert "'b'" in exc.value.message and exc.value.field == "sensitivity.hawq"


def test_needs_calibration_data(ctx):
    empty = EstimatorContext(ctx.model, ctx.layers, FORMATS, ctx.levels, ctx.calibration[:0], "h", 0)
    with pytest.raises(BitallocError) as exc:
        get_estimator("fisher").estimate(empty)
    assert exc.value.field == "data.calibration"


def test_model_without_gradients_is_refused():
    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.out = torch.nn.Linear(8, 20)

        def forward(self, ids):
            with torch.no_grad():
                return self.out(self.emb(ids))

    model = from_module(Frozen())
    layers = select_layers(list_layers(model))
    ctx = EstimatorContext(model, layers, FORMATS, filled_levels(model, layers, FORMATS),
                           torch.randint(0, 20, (2, 6)), "h", 0)
    with pytest.raises(BitallocError) as exc:
        get_estimator("hawq").estimate(ctx)
    assert "needs gradients" in exc.value.message
    assert get_estimator("sqnr").estimate(ctx).values.shape == (1, 3)


def test_top_eigenvalue_option_matches_the_exact_dominant_eigenvalue(ctx):
    layer = ctx.layers[4]
    one = EstimatorContext(ctx.model, [layer], ctx.formats, ctx.levels, ctx.calibration, ctx.data_hash, seed=0)
    hawq = get_estimator("hawq", top_eigenvalue=True, power_iters=200)
    estimate = hawq._top_eigenvalue(one, layer, ctx.calibration)
    named = dict(ctx.model.module.named_parameters())
    key = f"{layer.name}.weight"
    h = hessian(lambda w: _mean_loss(ctx.model, {**named, key: w}, ctx.calibration))(named[key].detach())
    eig = torch.linalg.eigvalsh(h.reshape(named[key].numel(), -1))
    dominant = float(eig[eig.abs().argmax()])
    assert estimate == pytest.approx(dominant, rel=0.05)
    table = run_estimator(hawq, one)
    assert table.values[0, 0] == pytest.approx(0.5 * max(estimate, 0) * float(one.delta(layer, FORMATS[0]).pow(2).sum()),
                                               rel=0.05)
