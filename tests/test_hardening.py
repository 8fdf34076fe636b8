"""What a hostile or careless input, an interrupt or a second job must never do: run foreign code, print a
traceback, exit 0, leave half a result, or report a number that measures nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bitalloc.cli import main
from conftest import tiny_job

CLI = [sys.executable, "-m", "bitalloc.cli"]


def _write(tmp_path, spec, name="job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec) if isinstance(spec, dict) else spec)
    return str(path)


def _refused(capsys, args, field) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"error: {field}"), err
    return err


# --- malformed specs: (patch applied to a valid tiny job, field the one line must name) ---
SPECS = [
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"seed": "abc"}, "seed"),
    ({"name": "../escape"}, "name"),
    ({"output": "runs/{nope}"}, "output"),
    ({"output": "runs/{0}"}, "output"),
    ({"formats": {"group_size": []}}, "formats.group_size"),
    ({"formats": {"group_size": 10**18}}, "formats.group_size"),
    ({"formats": {"symmetric": []}}, "formats.symmetric"),
    ({"formats": {"bits": []}}, "formats.bits"),
    ({"formats": {"scale_dtype": "int8"}}, "formats.scale_dtype"),
    ({"search": {"points": 10**9}}, "search.points"),
    ({"search": {"evaluations": -1}}, "search.evaluations"),
    ({"search": {"max_latency": 1.0}}, "search"),
    ({"data": {"seq_len": 10**9}}, "data.seq_len"),
    ({"data": {"evaluation": 0}}, "data.evaluation"),
    ({"data": {"calibration": 0}}, "data.calibration"),
    ({"data": {"calibration": 0}, "sensitivity": {"estimator": "sqnr"}, "search": {"evaluations": 4}},
     "search.evaluations"),
    ({"data": {"source": "/nonexistent/*.txt"}}, "data.source"),
    ({"sensitivity": {"estimator": "sqnr", "params": {"side": "output"}}}, "sensitivity.params.side"),
    ({"sensitivity": {"estimator": "fisher", "params": {"max_tokens": "many"}}}, "sensitivity.params.max_tokens"),
    ({"sensitivity": {"estimator": "fisher", "params": {"side": "middle"}}}, "sensitivity.params.side"),
    ({"search": {"solver": "dp", "params": {"speed": 3}}}, "search.params.speed"),
    ({"search": {"solver": "auto", "params": {"population": "lots"}}}, "search.params.population"),
    ({"run": {"workers": -2}}, "run.workers"),
    ({"run": {"workers": 1, "gpus_per_worker": 1}}, "run.gpus_per_worker"),
    ({"run": {"address": "127.0.0.1:1"}}, "run.address"),
    ({"run": {"memory_limit": "lots"}}, "run.memory_limit"),
    ({"model": {"trust_remote_code": "maybe"}}, "model.trust_remote_code"),
    ({"tracking": {"colour": "red"}}, "tracking.colour"),
    # needing only the spec or a file, refused before the model loads (no memory-plan line first)
    ({"search": {"pin": {"mlp[": 4}}}, "search.pin"),
    ({"search": {"tie": ["(q"]}}, "search.tie[0]"),
    ({"model": {"include": ["*proj"]}}, "model.include[0]"),
    ({"search": {"pin": {"mlp": "w5g64a"}}}, "search.pin"),  # not a format of the job
    ({"search": {"min_bits": 6, "max_bits": 3}}, "search.min_bits"),
    ({"search": {"max_latency": 1.0, "latency_table": "/nonexistent/latency.json"}}, "search.latency_table"),
    ({"data": {"source": []}}, "data.source"),
    ({"sensitivity": {"estimator": "hawq", "params": {"tol": -1}}}, "sensitivity.params.tol"),
    ({"sensitivity": {"estimator": "sqnr", "params": {"max_tokens": 0}}}, "sensitivity.params.max_tokens"),
    ({"formats": {"method": "gguf", "types": ["q4_0"], "params": {"imatrix": "yes"}}}, "formats.params.imatrix"),
]


@pytest.mark.parametrize("patch, field", SPECS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(SPECS)])
def test_malformed_specs_get_one_line(patch, field, tiny_llama, text_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out, **patch))], field)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_empty_text_file_is_refused_before_the_model_loads(tiny_llama, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    spec = tiny_job(tiny_llama, tmp_path, tmp_path / "out", data={"source": [str(tmp_path / "empty.txt")]})
    assert "no text" in _refused(capsys, ["run", _write(tmp_path, spec)], "data.source")


RAW = [
    ("", "job"),
    ("model: {source: x}\nseed: 1\nseed: 2\n", "JOB"),
    ("model: !!python/object/apply:os.system ['echo pwned']\n", "JOB"),
    ("a: " + "[" * 1000 + "]" * 1000 + "\n", "JOB"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef")), "JOB"),
    ("- a\n- b\n", "job"),
    ("model: [unclosed\n", "JOB"),
    ("formats: {bits: [3]}\n", "model.source"),
]


@pytest.mark.parametrize("text, field", RAW, ids=range(len(RAW)))
def test_malformed_files_get_one_line(text, field, tmp_path, capsys):
    err = _refused(capsys, ["run", _write(tmp_path, text)], field)
    assert len(err) < 400


def test_files_that_are_not_utf8_yaml(tmp_path, capsys):
    (tmp_path / "u16.yaml").write_bytes("model: {source: x}\n".encode("utf-16"))
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    for name in ("u16.yaml", "bin.yaml"):
        assert "is not UTF-8 text" in _refused(capsys, ["run", str(tmp_path / name)], "JOB")


CALLS = [
    (["frob"], "usage"),
    (["run", "--nope", "x.yaml"], "usage"),
    (["layers"], "MODEL"),
    (["export", "DIR", "--point", "abc", "-o", "x.json"], "--point"),
    (["ui", "--port", "-1"], "--port"),
    (["ui", "--port", "65536"], "--port"),
    (["run", "JOB", "--set", "seed"], "--set"),
    (["run", "JOB", "--set", "seed=!!python/name:os.system"], "--set seed"),
    (["run", "JOB", "--set", "seed=[[[[[[["], "--set seed"),
    (["run", "JOB", "--set", "model=3"], "model"),
    (["run", "JOB", "--out", "FILE/sub"], "--out"),
    (["run", "JOB", "--out", "/proc/bitalloc-out"], "--out"),
    (["export", "DIR", "--avg-bits", "nan", "-o", "x.json"], "--avg-bits"),
    (["export", "DIR", "--avg-bits", "inf", "-o", "x.json"], "--avg-bits"),
    (["export", "DIR", "--point", "1", "-o", "FILE/x.json"], "--output"),
    (["export", "0123456789abcdef0123456789abcdef", "--point", "1", "-o", "x.json"], "TARGET"),
    (["export", "DIR", "--avg-bits", "1e308", "-o", "x.json"], "--avg-bits"),
    (["export", "DIR", "--point", "1", "--format", "json", "-o", "FILE"], "--output"),  # exists: --force replaces
    (["export", "DIR", "--point", "1", "--format", "json", "-o", "DIR"], "--output"),
    (["export", "DIR", "--point", "1", "-o", "missing/x.json"], "--output"),
    (["pack", "DIR", "--avg-bits", "1e308", "-o", "packed"], "--avg-bits"),
    (["run", "JOB", "--set", "output=/proc/bitalloc-out"], "output"),
    (["sensitivity", "MODEL", "--out", "/proc/bitalloc-table.json"], "--out"),
    (["run", "JOB", "--packages", "missing.json"], "--packages"),
    (["export", "0123456789abcdef0123456789abcdef", "--point", "1", "-o", "x.json", "--tracking-uri", "gopher://x"],
     "--tracking-uri"),
    (["export", "0123456789abcdef0123456789abcdef", "--point", "1", "-o", "x.json", "--tracking-uri",
      "http://127.0.0.1:9"], "--tracking-uri"),  # a server that is down
    (["run", "JOB", "--set", "model.source=" + "m" * 3000], ""),  # the system refuses the name: no staging left
    (["run", "JOB", "--packages", "FILE"], "--packages"),
    (["layers", "m" * 5000], ""),  # a name the system refuses: one line naming it
    (["export", "DIR", "--point", "1", "-o", "x" * 300 + ".json"], ""),
    (["run", "JOB", "--out", "o" * 300], ""),
    (["sensitivity", "score", "JOB", "--max-bits", "inf"], "--min-bits/--max-bits"),
    (["sensitivity", "score", "JOB", "-e", "bogus"], "--estimator"),
    (["pack", "DIR", "--point", "1", "-o", "/proc/packed"], "--output"),
    (["layers", "some-org/not-on-disk"], "model.source"),
    (["sensitivity", "score", "JOB", "-e", "fisher:side=!!python/name:os.system"], "--estimator"),
]


@pytest.mark.parametrize("args, field", CALLS, ids=[" ".join(a) for a, _ in CALLS])
def test_cli_misuse_gets_one_line(args, field, tiny_llama, text_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/absent.db")
    (tmp_path / "FILE").write_text("a file")
    (tmp_path / "DIR").mkdir()
    job = _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "out"))
    args = [job if a == "JOB" else a for a in args]
    _refused(capsys, args, field)
    assert not (tmp_path / "out").exists() and not (tmp_path / "absent.db").exists()
    assert not list(tmp_path.glob(".out*"))  # no staging, lock or temporary file left
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "mlflow.db").exists()


def _custom_code_model(src, dst):
    """A copy of a tiny model whose config asks transformers to run a module shipped beside it."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(config))
    marker = dst.parent / "EXECUTED"
    (dst / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                 "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    return marker


@pytest.mark.parametrize("answer", ["y\n", ""])
def test_custom_code_never_runs(answer, tiny_llama, tmp_path):
    marker = _custom_code_model(tiny_llama, tmp_path / "custom")
    proc = subprocess.run(CLI + ["layers", str(tmp_path / "custom")], input=answer, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "ships custom code" in proc.stderr and "model.trust_remote_code" in proc.stderr


def test_pickle_only_checkpoints_are_refused(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    assert "pickle weights" in _refused(capsys, ["layers", str(folder)], "model.source")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_checkpoint_is_one_line(damage, tiny_llama, tmp_path, capsys):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_llama, folder)
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    _refused(capsys, ["layers", str(folder)], "model.source")


@pytest.mark.parametrize("cut", ["in its header", "in its tensors"])
def test_truncated_gguf_is_one_line(cut, tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "broken.gguf"
    if cut == "in its header":
        path.write_bytes(b"GGUF\x03\x00\x00\x00\x10")
    else:
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        path.write_bytes(path.read_bytes()[:-100])
    assert "not a readable GGUF" in _refused(capsys, ["layers", str(path)], "model.source")


def test_binary_text_source_is_refused_before_loading(tiny_llama, tmp_path, capsys):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 64)
    spec = tiny_job(tiny_llama, tmp_path, tmp_path / "out", data={"source": [str(tmp_path / "blob.txt")]})
    assert "is not a UTF-8 text file" in _refused(capsys, ["run", _write(tmp_path, spec)], "data.source")


def test_sequences_longer_than_the_context_are_refused(tiny_llama, text_dir, tmp_path, capsys):
    spec = tiny_job(tiny_llama, text_dir, tmp_path / "out", data={"seq_len": 512})
    assert "context of 128 tokens" in _refused(capsys, ["run", _write(tmp_path, spec)], "data.seq_len")
    assert not list(tmp_path.glob(".out*"))


def test_memory_plan_refuses_what_cannot_fit(tiny_llama, text_dir, tmp_path, capsys):
    spec = tiny_job(tiny_llama, text_dir, tmp_path / "out", run={"workers": 0, "memory_limit": "64KiB"})
    with pytest.raises(SystemExit) as exc:
        main(["run", _write(tmp_path, spec)])
    plan, err = capsys.readouterr().err.strip().splitlines()[-2:]
    assert exc.value.code == 2 and plan.startswith("memory plan: this process ") and "working sets" in plan
    assert err.startswith("error: ") and "would hold about" in err and "64.0 KiB" not in err
    field = err.split(":")[1].strip()
    assert field in ("model.source", "model.exclude", "data.evaluation", "data.batch_size", "sensitivity.estimator")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_second_job_on_the_same_output_refuses(tiny_llama, text_dir, tmp_path, capsys):
    from bitalloc.jobs.runner import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        _refused(capsys, ["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out))], "--out")
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out))])  # free again once the first is done
    capsys.readouterr()
    assert (out / "front.json").is_file() and not list(tmp_path.glob(".out*"))


@pytest.mark.edits_results
def test_edited_results_are_refused(tiny_llama, text_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out))])
    capsys.readouterr()
    front = json.loads((out / "front.json").read_text())
    config_path = out / front["points"][0]["config"]
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "totals": {**config["totals"], "bytes": 1000}}))
    assert "claims 1000 bytes" in _refused(capsys, ["export", str(out), "--point", "1", "-o", "x.json"], "TARGET")
    layers = dict(list(config["layers"].items())[1:])
    config_path.write_text(json.dumps({**config, "layers": layers}))
    _refused(capsys, ["pack", str(out), "--point", "1", "-o", str(tmp_path / "packed")], "TARGET")
    config_path.write_text(json.dumps(config))

    escaping = {**front["points"][0], "config": "../../etc/passwd"}
    for points, says in (("not a list", "points"), ([escaping], "leaves the result folder")):
        (out / "front.json").write_text(json.dumps({**front, "points": points}))
        assert says in _refused(capsys, ["export", str(out), "--point", "1", "-o", "x.json"], str(out / "front.json"))
    (out / "front.json").write_bytes(b"\x00\x01binary")
    _refused(capsys, ["export", str(out), "--point", "1", "-o", "x.json"], str(out / "front.json"))
    assert not (tmp_path / "packed").exists()


@pytest.mark.edits_results
def test_fronts_whose_rows_disagree_with_their_configs_are_refused(tiny_llama, text_dir, tmp_path, capsys):
    """A point is chosen only among rows whose claims their config files bear out: a row with a better loss or fewer
    bits than its config, one naming another row's file, a loss that is not a number, a config edited to claim
    another measurement, and config files reached through a symlink (out of the folder, or to a device) are each
    refused by export, pack and verify in one line, with nothing written."""
    import math

    out = tmp_path / "out"
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, out, tracking={"enabled": False}))])
    capsys.readouterr()
    original = (out / "front.json").read_text()
    front = json.loads(original)
    uniform = next(i for i, p in enumerate(front["points"]) if p["kind"] == "uniform")
    first = front["points"][0]
    config_path = out / first["config"]
    config = config_path.read_text()

    def row(i, **change):  # an edit that also drops the digest (as results written before it had none)
        points = [dict(p) for p in front["points"]]
        points[i].update(change)
        return json.dumps({**front, "points": points, "digest": {}})

    edits = [
        ("front.json", row(uniform, loss=1e-6), "TARGET", "claims loss"),
        ("front.json", row(uniform, avg_bits=1.0), "TARGET", "avg bits"),
        ("front.json", row(uniform, config=first["config"]), str(out / "front.json"), "two rows name"),
        ("front.json", row(0, loss=math.nan), "TARGET", "not a number"),
        (first["config"], json.dumps({**json.loads(config), "metrics": {**json.loads(config)["metrics"], "kl": 0}}),
         str(config_path), "digest differs"),
        ("front.json", json.dumps({**front, "model": {**front["model"], "content_hash": "sha256:" + "0" * 64}}),
         str(out / "front.json"), "digest differs"),
    ]
    for name, text, field, says in edits:
        (out / name).write_text(text)
        for command in (["export", str(out), "--avg-bits", "8", "-o", str(tmp_path / "x.json")],
                        ["pack", str(out), "--avg-bits", "8", "-o", str(tmp_path / "packed")],
                        ["verify", str(out), "--avg-bits", "8", "--runtime", "bitalloc"]):
            assert says in _refused(capsys, command, field), (name, says, command[0])
        (out / "front.json").write_text(original)
        config_path.write_text(config)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(config)
    for target in (outside, Path("/dev/zero")):
        config_path.unlink()
        config_path.symlink_to(target)
        assert "symlink" in _refused(capsys, ["export", str(out), "--point", "1", "-o", str(tmp_path / "x.json")],
                                     str(out / "front.json"))
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "packed").exists()
    assert (out / "front.json").read_text() == original


def _job_process(spec_path, *extra, env=None):
    return subprocess.Popen(CLI + ["run", spec_path, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def _stopped_once_checkpointed(path, tmp_path, signum) -> tuple[subprocess.Popen, str, Path]:
    """A job started on `path`, sent `signum` once its first measurements are checkpointed: (process, stderr,
    checkpoint)."""
    proc = _job_process(path)
    checkpoint = tmp_path / ".out.partial" / "checkpoint.jsonl"
    deadline = time.monotonic() + 120
    while not (checkpoint.is_file() and checkpoint.stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc, err, checkpoint


@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_interrupt_exits_130_and_resumes(signum, workers, tiny_llama, text_dir, tmp_path):
    """Ctrl-C or SIGTERM, in-process or while two Ray workers evaluate: exit 130, the resume hint, and --resume
    finishes the job from its checkpoint."""
    out = tmp_path / "out"
    spec = tiny_job(tiny_llama, text_dir, out, sensitivity={"estimator": "measured"},
                    data={"evaluation": 8}, search={"points": 16}, run={"workers": workers})
    proc, err, _ = _stopped_once_checkpointed(_write(tmp_path, spec), tmp_path, signum)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted: resume with `bitalloc run --resume {out}`"
    assert "Traceback" not in err and not out.exists()
    done = subprocess.run(CLI + ["run", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    front = json.loads((out / "front.json").read_text())
    assert front["evaluations"]["from_checkpoint"] > 0


def test_a_new_job_never_deletes_an_interrupted_jobs_results(tiny_llama, text_dir, tmp_path):
    """A second job into the output dir of an interrupted one (here one that would fail anyway) refuses in one line
    pointing at --resume, and the interrupted job's checkpoint is left as it was; --fresh discards it on request."""
    out = tmp_path / "out"
    path = _write(tmp_path, tiny_job(tiny_llama, text_dir, out, sensitivity={"estimator": "measured"},
                                     data={"evaluation": 8}, search={"points": 16}))
    _, _, checkpoint = _stopped_once_checkpointed(path, tmp_path, signal.SIGINT)
    saved = checkpoint.read_bytes()
    again = subprocess.run(CLI + ["run", path, "--set", "run.memory_limit=1KiB"], capture_output=True, text=True)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1 and f"--resume {out}" in lines[0] and "--fresh" in lines[0]
    assert checkpoint.read_bytes() == saved
    fresh = subprocess.run(CLI + ["run", path, "--fresh"], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads((out / "front.json").read_text())["evaluations"]["from_checkpoint"] == 0
    assert not checkpoint.parent.exists()


def test_ray_internals_stay_out_of_the_terminal(tiny_llama, text_dir, tmp_path):
    out = tmp_path / "out"
    proc = _job_process(_write(tmp_path, tiny_job(tiny_llama, text_dir, out, run={"workers": 2})))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    for noise in ("core_worker", "Warning", "warnings.warn", "(raylet)", "INFO", "Traceback"):
        assert noise not in err, err
    assert "2 Ray workers" in err and (out / "job.log").is_file()


def test_two_jobs_create_one_store_and_are_both_tracked(tiny_llama, text_dir, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/fresh.db"}
    procs = [_job_process(_write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / f"out{i}", name=f"job{i}"),
                                 f"job{i}.yaml"), env=env) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "tracking off" not in err, err
    for i in range(2):
        assert json.loads((tmp_path / f"out{i}" / "front.json").read_text())["tracking"]["run_id"]


def test_ui_stopped_by_sigterm_leaves_no_server(tmp_path):
    import socket

    proc = subprocess.Popen(CLI + ["ui", "--tracking-uri", f"sqlite:///{tmp_path}/ui.db", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0].split()[0])
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted: the MLflow UI stopped", err
    assert time.monotonic() - started < 5
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_long_library_message_is_cut_at_a_sentence_or_a_word_never_mid_word():
    from bitalloc.errors import first_line

    said = ("Can't load tokenizer for 'x'. If you were trying to load it from the hub, make sure you don't have a "
            "local directory with the same name. Otherwise, make sure 'x' is the correct path to a directory "
            "containing all relevant files for a LlamaTokenizerFast tokenizer.")
    assert first_line(said) == said[:said.index("same name.") + len("same name.")]
    assert first_line("word " * 100, 42).endswith("word …") and len(first_line("word " * 100, 42)) <= 42
