"""Jobs on a Ray cluster through Ray Jobs: submit, status, logs, cancel, list.

A submitted job carries its spec (in its working dir) and the versions of the packages its
results depend on: the entrypoint checks them before running (`bitalloc run --packages`), and
`pip=True` also asks Ray to install exactly those versions in the job's environment. Results are
written to an absolute output dir on the cluster's filesystem.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from bitalloc import configio
from bitalloc.errors import BitallocError

from .cluster import probe
from bitalloc.pipeline import package_versions
from .spec import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 60.0


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    probe(address, "--address", 8265)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise BitallocError("--address", f"{address!r} is not a Ray Jobs server ({str(exc).splitlines()[0]})") from None


def submit(spec: JobSpec, out: Path, address: str | None, pip: bool = False) -> str:
    client = _client(address)
    packages = package_versions()
    workdir = Path(tempfile.mkdtemp(prefix="bitalloc-submit-"))
    (workdir / "spec.yaml").write_text(configio.dumps(spec.model_dump(mode="json"), ".yaml"))
    (workdir / "packages.json").write_text(json.dumps(packages, sort_keys=True))
    runtime_env: dict = {"working_dir": str(workdir)}
    if pip:
        runtime_env["pip"] = [f"{name}=={v}" for name, v in packages.items() if name != "bitalloc"]
    entrypoint = f"python -m bitalloc.cli run spec.yaml --out {out.resolve()} --packages packages.json"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                     metadata={"bitalloc_job": spec.name, "spec_hash": spec.spec_hash()})
        except RuntimeError as exc:
            # a freshly started head answers this until its job agent is up
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise BitallocError("--address", f"the cluster refused the job: {str(exc).splitlines()[0]}") from None
            time.sleep(1.0)


def _known(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        raise BitallocError("ID", f"no job {job_id!r} on this cluster; `bitalloc jobs` lists them") from None


def status(job_id: str, address: str | None) -> tuple[str, str]:
    info = _known(_client(address), job_id)
    return str(info.status.value), info.message or ""


def logs(job_id: str, address: str | None, follow: bool, write: Callable[[str], None]) -> None:
    client = _client(address)
    _known(client, job_id)
    if not follow:
        write(client.get_job_logs(job_id))
        return

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def cancel(job_id: str, address: str | None) -> None:
    client = _client(address)
    info = _known(client, job_id)
    if info.status.is_terminal():
        raise BitallocError("ID", f"job {job_id} already finished ({info.status.value}); nothing to cancel")
    client.stop_job(job_id)


def list_jobs(address: str | None) -> list:
    return sorted(_client(address).list_jobs(), key=lambda j: j.start_time or 0)


def check_packages(path: Path) -> None:
    """Refuse to run where the packages differ from those the job was submitted with."""
    try:
        expected = json.loads(configio.read_text(path, "--packages"))
    except json.JSONDecodeError:
        raise BitallocError("--packages", f"{str(path)!r} is not a JSON file of package versions") from None
    if not isinstance(expected, dict):
        raise BitallocError("--packages", f"{str(path)!r} is not a JSON file of package versions")
    actual = package_versions()
    wrong = [f"{name} {actual.get(name, 'missing')} (submitted with {v})" for name, v in expected.items()
             if actual.get(name) != v]
    if wrong:
        raise BitallocError("--packages", "this environment differs from the submitter's: " + "; ".join(wrong))
