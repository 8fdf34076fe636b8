"""Typed results and the paths around them: the shipped JSON Schemas, `/1` fronts, the table cache's key,
the runtimes' mapping rules (pure functions, no runtime installed), publishing, and byte-size budgets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from bitalloc import pipeline
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.formats import Format
from bitalloc.runtimes import Layer, get_runtime
from bitalloc.runtimes.llamacpp import ggml_type
from bitalloc.results import SCHEMA_DIR, json_schema, read_config, read_front
from conftest import front_of, tiny_job

FRONT_V1 = Path(__file__).parent / "data" / "front-v1"


def _write(tmp_path, spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("kind", ["front", "config"])
def test_shipped_schemas_are_the_models_schemas(kind, capsys):
    """The files in bitalloc/schemas/ are what the models generate (regenerate with `bitalloc schema KIND`)."""
    shipped = json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text())
    assert shipped == json_schema(kind)
    main(["schema", kind])
    assert json.loads(capsys.readouterr().out) == shipped


def test_a_v1_front_reads_as_points_and_still_exports(tmp_path, capsys):
    """A `bitalloc.front/1` result (the default job before front/2) exports as before: --avg-bits 3.5 picks the
    mixed config measured at KL 1.3308, not uniform 3-bit (2.1616)."""
    front = read_front(FRONT_V1 / "front.json")
    assert len(front.mixed) == 8 and [u.format for u in front.uniform][:2] == ["w2g64a", "w3g64a"]
    assert front.uniform[1].label == "uniform w3g64a" and front.reference.quality == pytest.approx(50.1386, abs=1e-4)
    main(["export", str(FRONT_V1), "--avg-bits", "3.5", "-o", str(tmp_path / "c.json")])
    assert "KL 1.3308" in capsys.readouterr().out
    assert read_config(tmp_path / "c.json") == read_config(FRONT_V1 / "configs" / "mixed-02-3.500b.json")


def test_table_cache_keys_on_the_estimator_version_and_declared_parameters(tiny_llama, text_dir, tmp_path,
                                                                          monkeypatch):
    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import parse_spec
    from bitalloc.sensitivity import get_estimator
    from bitalloc.sensitivity.sqnr import SQNR

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    spec = parse_spec(tiny_job(tiny_llama, text_dir, tmp_path / "o"))
    ws = open_workspace(spec, None)
    first = pipeline.sensitivity(ws, get_estimator("sqnr"), 0)
    assert not first.cache_hit and first.table.version == 1
    est = get_estimator("sqnr")
    est.scratch = "state an estimator keeps"  # not a declared parameter: not part of the key
    assert pipeline.sensitivity(ws, est, 0).cache_hit
    monkeypatch.setattr(SQNR, "version", 2)  # an estimator whose numbers changed
    changed = pipeline.sensitivity(ws, get_estimator("sqnr"), 0)
    assert not changed.cache_hit and changed.path != first.path and changed.table.version == 2
    assert pipeline.sensitivity(ws, get_estimator("sqnr", max_tokens=64), 0).cache_hit is False


def _layers(fmt: Format, names=("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"), width=512):
    return [Layer(n, fmt, 256, width) for n in names]


def test_gptqmodel_rules_anchor_each_format_and_leave_the_rest_unquantized():
    layers = _layers(Format(4, 128)) + [Layer("model.layers.0.mlp.down_proj", Format(8, 64), 512, 256),
                                         Layer("model.layers.0.mlp.up_proj", Format(16), 256, 512)]
    text, changed = get_runtime("gptqmodel").export(layers, "llama", nearest=False)
    doc = json.loads(text)
    assert changed == [] and (doc["bits"], doc["group_size"], doc["format"]) == (4, 128, "gptq")
    rules = {k: v for k, v in doc["dynamic"].items()}
    by_module = {}
    for rule, value in rules.items():
        sign, regex = rule.split(":", 1)
        for layer in layers:
            if re.match(regex, layer.name):
                by_module.setdefault(layer.name, []).append((sign, value))
    assert by_module["model.layers.1.self_attn.q_proj"] == [("+", {"bits": 4, "group_size": 128, "sym": False})]
    assert by_module["model.layers.0.mlp.down_proj"] == [("+", {"bits": 8, "group_size": 64, "sym": False})]
    assert by_module["model.layers.0.mlp.up_proj"] == [("-", {})]  # kept in 16 bits
    planar, _ = get_runtime("gptqmodel").export(_layers(Format(5, 64)), "llama", nearest=False)
    assert json.loads(planar)["format"] == "gptq_p"


def test_llmcompressor_recipe_groups_formats_and_ignores_sixteen_bit():
    layers = _layers(Format(3, 64, symmetric=True)) + [Layer("model.layers.0.mlp.up_proj", Format(16), 256, 512)]
    recipe = yaml.safe_load(get_runtime("llmcompressor").export(layers, "llama", nearest=False)[0])
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    (group,) = modifier["config_groups"].values()
    assert group["weights"] == {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": 64, "scale_dtype": "float16"}
    assert all(re.match(group["targets"][0].removeprefix("re:"), l.name) for l in layers[:2])
    assert modifier["ignore"] == ["lm_head", r"re:^(?:model\.layers\.0\.mlp\.up_proj)$"]


def test_llamacpp_types_follow_the_row_rule_and_refuse_what_they_cannot_hold():
    assert ggml_type(Format(3, 64), 512).value == "q3_K"  # 256-multiple rows take k-quants
    assert ggml_type(Format(4, 32), 96).value == "q4_1" and ggml_type(Format(4, 32, True), 96).value == "q4_0"
    up = ggml_type(Format(3, 32), 96)
    assert up.value == "q4_1" and not up.exact  # no 3-bit 32-block type: the nearest never has fewer bits
    assert ggml_type(Format(4, 32), 100).value == "f16" and ggml_type(Format(16), 100).exact
    text, _ = get_runtime("llamacpp").export(_layers(Format(6, 64)), "llama", nearest=False)
    assert text.split() == [r"^blk\.0\.attn_q\.weight$=q6_K", r"^blk\.1\.attn_q\.weight$=q6_K"]
    with pytest.raises(BitallocError) as exc:
        get_runtime("llamacpp").export(_layers(Format(3, 32), width=96), "llama", nearest=False)
    assert exc.value.field == "--format" and "--nearest" in exc.value.message


def test_hqq_sets_one_format_per_tag_and_names_what_it_raised():
    layers = [Layer("model.layers.0.self_attn.q_proj", Format(3, 64), 256, 512),
              Layer("model.layers.1.self_attn.q_proj", Format(4, 64), 256, 512)]
    with pytest.raises(BitallocError):
        get_runtime("hqq").export(layers, "llama", nearest=False)
    text, changed = get_runtime("hqq").export(layers, "llama", nearest=True)
    assert json.loads(text)["dynamic_config"] == {"self_attn.q_proj": {"nbits": 4, "group_size": 64}}
    assert len(changed) == 1 and changed[0].startswith("model.layers.0.self_attn.q_proj: w3g64a -> nbits=4")


def test_a_failed_job_leaves_no_output_and_keeps_an_earlier_one(tiny_llama, text_dir, tmp_path, capsys):
    """A job that fails after loading (here: a measuring solver given no evaluations) writes nothing new and
    leaves an earlier result in OUT as it was; a successful rerun replaces it (`publish`)."""
    out = tmp_path / "out"
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out))])
    before = (out / "front.json").read_bytes()
    bad = tiny_job(tiny_llama, text_dir, out, search={"solver": "evolutionary"})
    with pytest.raises(SystemExit) as exc:
        main(["run", _write(tmp_path, bad)])
    assert exc.value.code == 2 and "search.evaluations" in capsys.readouterr().err
    assert (out / "front.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "out"]  # no staging, lock or .old left
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out, seed=7))])
    assert front_of(out).job.seed == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "out"]


@pytest.mark.edits_results
def test_publish_replaces_an_earlier_result_whole(tmp_path):
    from bitalloc.paths import publish, staging_dir

    out = tmp_path / "out"
    (out / "configs").mkdir(parents=True)
    (out / "configs" / "stale.json").write_text("{}")
    staging = staging_dir(out)
    (staging / "configs").mkdir(parents=True)
    (staging / "front.json").write_text("new")
    publish(staging, out)
    assert (out / "front.json").read_text() == "new" and not (out / "configs" / "stale.json").exists()
    assert not staging.exists() and not (tmp_path / ".out.old").exists()


def test_byte_size_budgets_end_to_end(tiny_llama, text_dir, tmp_path, capsys):
    """Budgets written as sizes: the point is labelled with the size, fits it, and export --budget finds it."""
    probe = tmp_path / "probe"
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, probe))])
    front = front_of(probe)
    size = f"{(front.uniform[0].bytes + front.uniform[-1].bytes) // 2 // 1000}kB"
    out = tmp_path / "sized"
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out, search={"budgets": [size, 4.0]}))])
    capsys.readouterr()
    limit = int(size.removesuffix("kB")) * 1000
    point = next(p for p in front_of(out).mixed if p.label == f"mixed @ {size}")
    assert point.bytes <= limit
    main(["export", str(out), "--budget", size, "-o", str(tmp_path / "c.json")])
    chosen = read_config(tmp_path / "c.json")
    assert chosen.totals.bytes <= limit
    assert chosen.measured()[0] == min(p.loss for p in front_of(out).points if p.bytes <= limit)
    shutil.rmtree(probe)
