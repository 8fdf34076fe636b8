"""Evaluation on a real local Ray (2 CPUs): same fronts as in process, lost workers, resumed drivers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
import yaml

from bitalloc.cli import main
from helpers import filled_levels
from bitalloc.formats import Format
from bitalloc.model import list_layers, load_model, select_layers
from bitalloc.tasks import EvalTask, LocalRunner
from conftest import front_of, tiny_job


def _write(tmp_path, spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _front(out):
    front = front_of(out)
    return front, [(p.label, p.bytes, p.loss, p.quality) for p in front.points]


def test_ray_front_equals_in_process_front(tiny_llama, text_dir, tmp_path):
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "local")), "--workers", "0"])
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "ray")), "--workers", "2"])
    local, local_rows = _front(tmp_path / "local")
    remote, remote_rows = _front(tmp_path / "ray")
    # the same configs; metrics within the README's 1e-6 relative (thread counts differ between the processes)
    assert [(label, size) for label, size, *_ in local_rows] == [(label, size) for label, size, *_ in remote_rows]
    for (_, _, *ours), (_, _, *theirs) in zip(local_rows, remote_rows):
        assert all(abs(a - b) <= 1e-6 * max(abs(b), 1e-12) for a, b in zip(ours, theirs))
    again = tmp_path / "again"  # the same worker count: the same metrics to the last bit
    main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, again)), "--workers", "0"])
    assert _front(again)[1] == local_rows
    assert remote.evaluations.where.startswith("2 Ray workers on embedded Ray")
    assert local.job.spec_hash == remote.job.spec_hash


def test_a_killed_worker_changes_nothing(tiny_llama):
    from bitalloc.jobs.cluster import ray_session
    from bitalloc.jobs.workers import RayRunner

    model = load_model(str(tiny_llama))
    layers = select_layers(list_layers(model))
    formats = (Format(2, 16), Format(4, 16), Format(8, 16))
    levels = filled_levels(model, layers, formats)
    tokens = {"evaluation": torch.randint(0, 90, (2, 32), generator=torch.Generator().manual_seed(0))}
    tasks = [EvalTask.config({l.name: formats[i % 3] for l in layers[: 1 + i % len(layers)]}, "evaluation")
             for i in range(24)]
    expected = LocalRunner(model, levels, tokens).map(tasks)
    with ray_session(None, 2):
        runner = RayRunner(model.module, levels, tokens, 2, workers=2)
        killed = []

        def kill_once(index, _result):
            if not killed:
                killed.append(index)
                ray.kill(runner.actors[0], no_restart=False)

        results = runner.map(tasks, on_result=kill_once)
        runner.close()
    assert killed and results == expected


def test_a_killed_driver_resumes_and_runs_only_the_rest(tiny_llama, text_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    job = _write(tmp_path, tiny_job(tiny_llama, text_dir, out, search={"budgets": [4.0, 5.0], "points": 6},
                                    sensitivity={"estimator": "measured", "params": {"max_tokens": 32}}))
    checkpoint = tmp_path / ".out.partial" / "checkpoint.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "bitalloc.cli", "run", job], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not checkpoint.exists() or len(checkpoint.read_text().splitlines()) < 10):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = 0
    for line in checkpoint.read_text().splitlines():  # a kill mid-write leaves a torn last line, which is skipped
        try:
            json.loads(line)
            done_before += 1
        except ValueError:
            pass
    assert done_before >= 10 and not out.exists()
    main(["run", "--resume", str(out)])
    doc, rows = _front(out)
    assert doc.evaluations.from_checkpoint == done_before
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "fresh-cache"))  # recompute the table as the first run did
    main(["run", job, "--out", str(fresh)])
    fresh_doc, fresh_rows = _front(fresh)
    assert rows == fresh_rows
    assert doc.evaluations.computed + doc.evaluations.from_checkpoint == fresh_doc.evaluations.computed
    assert not (tmp_path / ".out.partial").exists()


def test_resume_without_an_interrupted_job(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--resume", str(tmp_path / "nothing")])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --resume: no interrupted job")


def test_unreachable_cluster_fails_fast(tiny_llama, text_dir, tmp_path, capsys):
    start = time.time()
    with pytest.raises(SystemExit) as exc:
        main(["run", _write(tmp_path, tiny_job(tiny_llama, text_dir, tmp_path / "o")), "--address", "127.0.0.1:9"])
    assert exc.value.code == 2 and time.time() - start < 60
    assert capsys.readouterr().err.startswith("error: run.address: cannot reach '127.0.0.1:9'")
