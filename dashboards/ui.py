"""`bitalloc ui`: the MLflow UI on loopback for a job's store, and the URL to open: for a job, its run's front figure
(the run page's artifact view of results/plots/front.png, which MLflow keeps with the run; the figure shows the
measured front, the uniform baselines and what runtimes built), else the experiment's or the store's runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from bitalloc.errors import BitallocError
from bitalloc.results import read_front

from .tracking import client, resolve_uri, sqlite_missing

HOST = "127.0.0.1"


class Located(NamedTuple):
    uri: str
    experiment_id: Optional[str] = None
    run_id: Optional[str] = None


def locate(target: Optional[str], tracking_uri: Optional[str]) -> Located:
    """The store, and the experiment and job run to show, for a job output dir, a job YAML (its experiment), or
    nothing (the default store)."""
    if target is None:
        return Located(resolve_uri(tracking_uri))
    path = Path(target)
    if path.is_dir():
        if not (path / "front.json").is_file():
            raise BitallocError("TARGET", f"{target!r} holds no front.json; give a job's output dir or job YAML")
        info = read_front(path / "front.json").tracking
        if info is None:
            raise BitallocError("TARGET", f"the job in {target!r} was not tracked (tracking off, or the store failed)")
        uri = tracking_uri or info.uri
        if sqlite_missing(uri):
            raise BitallocError("TARGET", f"the job was tracked in {uri}, which no longer exists")
        return Located(uri, info.experiment_id, info.run_id)
    if path.suffix in (".yaml", ".yml"):
        from bitalloc.jobs.spec import load_spec

        spec = load_spec(path)
        uri = resolve_uri(tracking_uri or spec.tracking.uri)
        found = client(uri).get_experiment_by_name(spec.tracking.experiment or spec.name)
        if found is None:
            raise BitallocError("TARGET", f"no experiment {spec.tracking.experiment or spec.name!r} in {uri}; "
                                          f"run the job first")
        return Located(uri, found.experiment_id)
    raise BitallocError("TARGET", f"{target!r} is neither a job's output dir nor a job YAML")


FRONT_FIGURE = "results/plots/front.png"


def landing_url(base: str, where: Located) -> str:
    """The job run's front figure, else the experiment's runs, else the store's start page."""
    if where.run_id:
        return f"{base}/#/experiments/{where.experiment_id}/runs/{where.run_id}/artifacts/{FRONT_FIGURE}"
    return f"{base}/#/experiments/{where.experiment_id}/runs" if where.experiment_id else base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def serve(uri: str, port: int = 5000, timeout: float = 120.0,
          starting: Callable[[str], None] | None = None) -> Iterator[str]:
    """Run `mlflow ui` on loopback for store URI until the block ends; `starting(base URL)` is called as soon as the
    server is launched, and the block gets the base URL once it answers. Stopping it takes a second or two."""
    port = port or _free_port()
    with socket.socket() as s:
        if s.connect_ex((HOST, port)) == 0:
            raise BitallocError("--port", f"{port} is in use on {HOST}; choose another, or 0 for any free port")
    if uri.startswith("sqlite:///"):
        client(uri).search_experiments(max_results=1)  # creates or upgrades the store's tables before the UI reads it
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port),
           "--workers", "1"]
    # its own process group, so stopping it stops its server workers too, at once
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://{HOST}:{port}"
    if starting:
        starting(base)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = (proc.stderr.read() or "").strip().splitlines()
                raise BitallocError("ui", f"the MLflow UI exited: {err[-1] if err else proc.returncode}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BitallocError("ui", f"the MLflow UI did not answer on {base} within {timeout:.0f} s"
                                        ) from None
                time.sleep(0.5)
        yield base
    finally:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, signum)
                proc.wait(2)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()

