"""Encoders are measured on what their checkpoint holds, their final hidden state, never by next-token perplexity."""

import json

import pytest
import torch
import yaml

from bitalloc.cli import main
from bitalloc.model import HIDDEN_STATE, NEXT_TOKEN, list_layers, load_model
from conftest import _save, _tokenizer, front_of, tiny_job


@pytest.fixture(scope="module", params=["without head", "with MLM head"])
def tiny_bert(request, tmp_path_factory, text_dir):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(0)
    tok = _tokenizer((text_dir / "part0.txt").read_text())
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    cls = BertModel if request.param == "without head" else BertForMaskedLM
    return _save(cls(cfg), tok, tmp_path_factory.mktemp("tiny-bert"))


def test_an_encoder_is_measured_on_its_hidden_state(tiny_bert):
    model = load_model(str(tiny_bert))
    assert model.metric == HIDDEN_STATE and type(model.module).__name__ == "BertModel"
    assert not any("pooler" in layer.name for layer in list_layers(model))


def test_a_causal_lm_stays_next_token(tiny_llama):
    assert load_model(str(tiny_llama)).metric == NEXT_TOKEN


def test_an_lm_without_its_head_weights_is_not_scored_by_a_random_head(tiny_llama, tmp_path):
    """An untied LM whose checkpoint lacks lm_head: the head would be random, so the hidden state is measured."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path)
    weights = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("lm_head")}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for f in tiny_llama.glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert load_model(str(tmp_path)).metric == HIDDEN_STATE


@pytest.mark.parametrize("estimator", ["fisher", "sqnr", "measured"])
def test_an_encoder_job_reports_hidden_state_quality(estimator, tiny_bert, text_dir, tmp_path, capsys):
    out = tmp_path / "out"
    spec = tiny_job(tiny_bert, text_dir, out, sensitivity={"estimator": estimator})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(tmp_path / "job.yaml")])
    front = front_of(out)
    assert front.metric.kind == HIDDEN_STATE and (front.metric.loss, front.metric.quality) == ("rel_mse", "cosine")
    assert front.reference.quality == pytest.approx(1.0, abs=1e-6)  # the FP model's own states: cosine 1
    uniform = {u.format: u for u in front.uniform}
    assert uniform["w2g32a"].loss > uniform["w4g32a"].loss > uniform["w8g32a"].loss
    assert uniform["w8g32a"].quality > uniform["w2g32a"].quality
    assert front.reference.quality == pytest.approx(1.0, abs=1e-6)
    config = json.loads((out / front.points[0].config).read_text())
    assert "rel_mse" in config["metrics"] and "kl" not in config["metrics"]
    printed = capsys.readouterr().out
    assert "rel. MSE" in printed and "PPL" not in printed and "perplexity" not in printed


def test_hidden_state_fisher_predicts_the_measured_relative_mse(tiny_bert, text_dir, tmp_path):
    """½ΔWᵀFΔW with the Gaussian-target Fisher is the per-token relative MSE: same scale as measurement."""
    from bitalloc import pipeline
    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import parse_spec
    from bitalloc.progress import Stages
    from bitalloc.sensitivity import get_estimator

    spec = parse_spec(tiny_job(tiny_bert, text_dir, tmp_path / "o", data={"calibration": 4}))
    with Stages() as stages:
        ws = open_workspace(spec, stages)
        fisher = pipeline.sensitivity(ws, get_estimator("fisher"), spec.seed, stages).table
        measured = pipeline.sensitivity(ws, get_estimator("measured", max_tokens=128), spec.seed, stages).table
    ratio = fisher.values[:, 0].sum() / measured.values[:, 0].sum()
    assert 0.2 < ratio < 5, ratio


def test_a_float16_reference_is_refused_for_an_encoder(tiny_bert, text_dir, tmp_path, capsys):
    spec = tiny_job(tiny_bert, text_dir, tmp_path / "out", data={"reference": "float16"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exc:
        main(["run", str(tmp_path / "job.yaml")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: data.reference: float16 applies to next-token models")
    assert "\n" not in err and not (tmp_path / "out").exists()
