"""submit / status / logs / cancel / jobs against a `ray start --head` cluster on loopback that this
test starts and stops itself: only the processes of its own temp dir are stopped, never `ray stop`."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bitalloc.cli import main
from conftest import front_of, tiny_job

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(marker: str) -> list[int]:
    """PIDs whose command line names `marker`, and all their descendants."""
    parents = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if marker in cmd:
            roots.append(int(entry.name))
    found = set(roots)
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        if not more:
            return sorted(found)
        found |= more


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp}",
                    # its own agent port: another Ray on this machine (a job running beside the tests) holds the default
                    f"--dashboard-agent-listen-port={_free_port()}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _processes_of(str(temp)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        assert not _processes_of(str(temp))


def _wait(address, job_id, capsys, states=("SUCCEEDED", "FAILED", "STOPPED"), timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        main(["jobs", "status", job_id, "--address", address])
        line = capsys.readouterr().out
        if any(s in line for s in states):
            return line
        time.sleep(1)
    raise AssertionError(f"{job_id} did not finish")


def test_submit_status_logs_jobs(cluster, tiny_llama, text_dir, tmp_path, capsys):
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(tiny_job(tiny_llama, text_dir, out)))
    main(["jobs", "submit", str(spec), "--address", cluster])
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in _wait(cluster, job_id, capsys)
    main(["jobs", "logs", job_id, "--address", cluster])
    assert "Pareto front" in capsys.readouterr().out
    front = front_of(out)
    assert front.job.name == "tiny" and front.job.packages["bitalloc"]
    main(["jobs", "--address", cluster])
    assert job_id in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "cancel", job_id, "--address", cluster])
    assert exc.value.code == 2 and "already finished (SUCCEEDED)" in capsys.readouterr().err


def test_cancel_a_running_job(cluster, tiny_llama, text_dir, tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    slow = tiny_job(tiny_llama, text_dir, tmp_path / "out", search={"solver": "evolutionary", "evaluations": 100000,
                                                                    "screen_tokens": 32, "params": {"population": 4}})
    spec.write_text(yaml.safe_dump(slow))
    main(["jobs", "submit", str(spec), "--address", cluster])
    job_id = capsys.readouterr().out.strip()
    _wait(cluster, job_id, capsys, states=("RUNNING",))
    main(["jobs", "cancel", job_id, "--address", cluster])
    assert "stop requested" in capsys.readouterr().out
    assert "STOPPED" in _wait(cluster, job_id, capsys)
    assert not (tmp_path / "out").exists()


def test_unknown_job_and_unreachable_server(cluster, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "status", "raysubmit_nope", "--address", cluster])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ID: no job 'raysubmit_nope'")
    start = time.time()
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "--address", "http://127.0.0.1:9"])
    assert time.time() - start < 30 and capsys.readouterr().err.startswith("error: --address: cannot reach")
