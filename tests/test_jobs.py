"""`bitalloc run` / `export` end to end on tiny models, and every bad input the CLI must refuse cleanly."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from bitalloc.cli import main
from conftest import front_of, tiny_job


def _write(tmp_path, spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama, text_dir):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    main(["run", _write(tmp, tiny_job(tiny_llama, text_dir, out)), "--set", "seed=3"])
    return out


def test_run_writes_a_measured_front(finished):
    front = front_of(finished)
    assert json.loads((finished / "front.json").read_text())["schema"] == "bitalloc.front/2"
    assert front.job.seed == 3
    labels = [p.label for p in front.mixed]
    assert "mixed @ 4 bits" in labels and "mixed @ 5 bits" in labels
    for p in front.points:
        if p.label.startswith("mixed @"):
            assert p.avg_bits <= float(p.label.split("@ ")[1].split()[0]) + 1e-9
        config = json.loads((finished / p.config).read_text())
        assert config["schema"] == "bitalloc.config/1"
        assert config["totals"]["bytes"] == p.bytes and config["metrics"]["kl"] == p.loss
        assert len(config["layers"]) == front.model.quantized_layers == 15  # 14 Linear layers and the embedding
    assert [u.format for u in front.uniform] == ["w2g32a", "w3g32a", "w4g32a", "w8g32a"]
    assert [u.label for u in front.uniform][0] == "uniform w2g32a"
    assert front.uniform[0].loss > front.uniform[-1].loss
    proxy = front.proxy_front
    assert proxy.bytes == sorted(proxy.bytes)
    assert all(a > b for a, b in zip(proxy.predicted, proxy.predicted[1:]))
    assert not list(finished.parent.glob(".*partial*"))


def test_rerun_gives_the_same_front(finished, tiny_llama, text_dir, tmp_path):
    out = tmp_path / "again"
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out)), "--set", "seed=3"])
    a = json.loads((finished / "front.json").read_text())
    b = json.loads((out / "front.json").read_text())
    for doc in (a, b):
        doc.pop("timings_s")
        doc["sensitivity"].pop("wall_time_s")
        doc["solver"].pop("wall_time_s")
        doc.pop("tracking")
        doc["digest"].pop("front")  # the front's own digest covers its wall times
    assert a == b


def test_export_picks_the_best_config_that_fits(finished, tmp_path):
    front = front_of(finished)
    main(["export", str(finished), "--avg-bits", "5", "-o", str(tmp_path / "c.yaml")])
    doc = yaml.safe_load((tmp_path / "c.yaml").read_text())
    fitting = [p for p in front.points if p.avg_bits <= 5 + 1e-9]
    assert doc["metrics"]["kl"] == min(p.loss for p in fitting)
    main(["export", str(finished), "--budget", f"{doc['totals']['bytes']}B", "-o", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())["totals"] == doc["totals"]
    with pytest.raises(SystemExit):  # an existing file is replaced only when asked
        main(["export", str(finished), "--avg-bits", "8", "-o", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())["totals"] == doc["totals"]
    main(["export", str(finished), "--avg-bits", "8", "-o", str(tmp_path / "c.json"), "--force"])
    assert json.loads((tmp_path / "c.json").read_text())["totals"]["avg_bits"] > doc["totals"]["avg_bits"]


def test_gpt2_style_model_runs(tiny_gpt2, text_dir, tmp_path):
    out = tmp_path / "gpt2"
    main(["run", _write(tmp_path, tiny_job(tiny_gpt2, text_dir, out)), "--set", "search.budgets=[3.5]"])
    front = front_of(out)
    assert front.model.quantized_layers == 9 and front.mixed  # wte (lm_head's tensor) and 8 Conv1D layers


BAD = [
    ({"formats": {"bits": [2, 7]}}, "formats.bits: 7 is not allowed; allowed: 2, 3, 4, 5, 6, 8, 16"),
    ({"formats": {"group_size": 0}}, "formats.group_size: 0 is not allowed"),
    ({"search": {"budgets": [1.0]}}, "search.budgets[0]: "),
    ({"search": {"budgets": ["1GiB"]}}, "search.budgets[0]: "),
    ({"search": {"budgets": ["80 apples"]}}, "search.budgets[0]: '80 apples' is not a size"),
    ({"model": {"exclude": ["nope"]}}, "model.exclude[0]: 'nope' matches no quantizable layer"),
    ({"sensitivity": {"estimator": "oracle"}}, "sensitivity.estimator: 'oracle' is not an estimator; allowed: fisher, hawq, linearity, measured, sqnr"),
    ({"search": {"solver": "magic"}}, "search.solver: 'magic' is not a solver; allowed: auto, dp, evolutionary, ilp, optuna"),
    ({"data": {"seq_len": 1}}, "data.seq_len: "),
    ({"colour": "red"}, "colour: unknown key; allowed here: name, seed"),
    ({"data": {"sorce": "x"}}, "data.sorce: unknown key; allowed here: source, seq_len"),
]


@pytest.mark.parametrize("patch, expected", BAD)
def test_bad_job_fields(patch, expected, tiny_llama, text_dir, tmp_path, capsys):
    out = tmp_path / "out"
    spec = tiny_job(tiny_llama, text_dir, out, **patch)
    with pytest.raises(SystemExit) as exc:
        main(["run", _write(tmp_path, spec)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: " + expected.split(":")[0]), err
    assert expected in err, err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_budget_range_is_printed(tiny_llama, text_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "o", search={"budgets": [9.5]}))])
    err = capsys.readouterr().err
    assert re.search(r"outside the feasible range \d+\.\.\d+ bytes \(3\.267\.\.9\.267 avg bits\)", err), err


@pytest.mark.parametrize("content, expected", [
    ("model: [unclosed", "error: JOB: malformed YAML at line 1"),
    ("- a\n- b\n", "error: job: the job file must be a YAML mapping"),
])
def test_malformed_files(content, expected, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["run", str(path)])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith(expected)


def test_unknown_model_and_missing_file(tmp_path, capsys, text_dir):
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path / "nope.yaml")])
    assert capsys.readouterr().err.startswith("error: JOB: ")
    spec = tiny_job(tmp_path / "no-model-here.gguf", text_dir, tmp_path / "o")
    with pytest.raises(SystemExit):
        main(["run", _write(tmp_path, spec)])
    assert capsys.readouterr().err.startswith("error: model.source: GGUF file")


def test_export_refusals(finished, tmp_path, capsys):
    cases = [
        (["--avg-bits", "1", "-o", str(tmp_path / "x.json")], "error: --avg-bits: no measured config fits"),
        (["-o", str(tmp_path / "x.json")], "error: --avg-bits/--budget/--point: give exactly one"),
        (["--budget", "1MiB", "-o", str(tmp_path / "x.txt")], "error: --format: cannot tell the format"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exc:
            main(["export", str(finished), *args])
        assert exc.value.code == 2 and capsys.readouterr().err.startswith(expected)
    assert not (tmp_path / "x.json").exists()


def test_real_entry_point_prints_no_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {source: smollm2-135m}\nformats: {bits: [3, 9]}\n")
    proc = subprocess.run([sys.executable, "-m", "bitalloc.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: formats.bits: 9 is not allowed; allowed: 2, 3, 4, 5, 6, 8, 16"]


def test_layers_command_lists_shapes_and_bytes(tiny_gpt2, capsys):
    main(["layers", str(tiny_gpt2), "--bits", "4", "--bits", "16", "--group-size", "32"])
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "96 x 32" in out
    # 96 x 32 at 4 bits g32 asymmetric fp16: 96*32/2 code bytes + 96 groups * 4 bytes; fp16: 96*32*2
    assert f"{96 * 16 + 96 * 4:,}" in out and f"{96 * 32 * 2:,}" in out
    assert "transformer.wte" in out  # lm_head is shown tied to the embeddings


def test_layers_command_refuses_bad_bits(tiny_gpt2, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["layers", str(tiny_gpt2), "--bits", "9"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --bits: 9 is not allowed")


def test_sensitivity_tables_are_cached_and_identical(tiny_llama, text_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    job = _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "o"))
    main(["sensitivity", job, "-e", "fisher:side=output", "--out", str(tmp_path / "t1.json")])
    first = capsys.readouterr()
    main(["sensitivity", job, "-e", "fisher:side=output", "--out", str(tmp_path / "t2.json")])
    second = capsys.readouterr()
    assert "cache hit" not in first.err + first.out and "cache hit" in second.err + second.out
    assert (tmp_path / "t1.json").read_text() == (tmp_path / "t2.json").read_text()
    table = json.loads((tmp_path / "t1.json").read_text())
    assert table["estimator"] == "fisher" and table["params"]["side"] == "output"
    assert len(table["values"]) == 15 and table["data_hash"].startswith("sha256:")


def test_sensitivity_score_ranks_estimators(tiny_llama, text_dir, tmp_path, capsys):
    job = _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "o"))
    main(["sensitivity", "score", job, "-e", "sqnr", "-e", "measured", "--configs", "12", "--min-bits", "3.3",
          "--max-bits", "8", "--out", str(tmp_path / "score.json")])
    doc = json.loads((tmp_path / "score.json").read_text())
    rows = {r["estimator"]: r for r in doc["rows"]}
    assert set(rows) == {"sqnr", "measured"} and len(doc["configs"]) == 12
    bits = [c["avg_bits"] for c in doc["configs"]]
    assert min(bits) < 5 < max(bits)
    assert rows["measured"]["spearman"] > 0.5
    assert "Spearman" in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["sensitivity", "score"], "error: JOB: "),
    (["sensitivity", "MODEL", "-e", "oracle"], "error: --estimator: 'oracle' is not an estimator"),
    (["sensitivity", "score", "JOB", "--configs", "1"], "error: --configs: "),
    (["sensitivity", "score", "JOB", "-e", "fisher:side"], "error: --estimator: "),
    (["sensitivity", "score", "JOB", "-e", "fisher:side=middle"], "error: --estimator.side: 'middle' is not allowed"),
])
def test_sensitivity_refusals(args, expected, tiny_llama, text_dir, tmp_path, capsys):
    job = _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "o"))
    args = [job if a == "JOB" else str(tiny_llama) if a == "MODEL" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and capsys.readouterr().err.startswith(expected)
