"""MLflow tracking: a job is a parent run, each measured front point (and uniform baseline) a child run.

The parent holds the spec, seed, spec hash and package versions (params and tags) and, as artifacts,
the job's whole result folder: front.json, the configs, the sensitivity table and the plots. A child
holds one point's metrics (avg_bits, bytes, mib, kl, ppl, predicted) and its config, so MLflow's own
chart and compare views draw the front.

Tracking never blocks a search: the first failing call prints one warning, turns tracking off for the
rest of the job, and the job keeps its local results.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console

from bitalloc.errors import BitallocError, first_line
from bitalloc.results import Front

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "bitalloc.kind"
POINT_METRICS = ("avg_bits", "bytes", "mib", "predicted")  # and the job's metric's loss and quality (kl, ppl)


def resolve_uri(uri: Optional[str]) -> str:
    """The store to use: the given URI, else MLFLOW_TRACKING_URI, else a sqlite file in the working dir.

    A relative sqlite path is made absolute, so the URI recorded with the results still points at the
    same file when read from elsewhere."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return uri


def _quiet_mlflow() -> None:
    """No telemetry, no schema-migration chatter, and fail fast instead of retrying a dead server for minutes."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


@contextmanager
def store_lock(uri: str):
    """Serialise the creation (and schema migration) of a sqlite store between processes."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def client(uri: str):
    _quiet_mlflow()
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow.MlflowClient(uri)


def sqlite_missing(uri: str) -> bool:
    """A sqlite store whose file is not there (opening it would create an empty one)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def existing_store(tracking_uri: Optional[str], run_id: str) -> str:
    """The MLflow store to find run `run_id` in, refused in one line where it is an absent sqlite store."""
    uri = resolve_uri(tracking_uri)
    if sqlite_missing(uri):
        raise BitallocError("TARGET", f"no MLflow store at {uri} to find run {run_id} in; give --tracking-uri")
    return uri


def get_run(run_id: str, uri: str):
    """The MLflow run, or one line saying it is not in the store."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise BitallocError("TARGET", f"no MLflow run {run_id} in {uri}") from None
        raise BitallocError("--tracking-uri", f"the MLflow store {uri} cannot be read: {first_line(exc)}") from None
    except Exception as exc:  # a server that is down, a scheme MLflow does not know
        raise BitallocError("--tracking-uri", f"the MLflow store {uri} cannot be reached: {type(exc).__name__}: "
                                              f"{first_line(exc)}") from None


def fetch_artifact(run_id: str, path: str, into: Path, uri: str, missing: str) -> Path:
    """One artifact (file or folder) of a run downloaded into `into`; `missing` is the one-line error otherwise."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(into), tracking_uri=uri))
    except (MlflowException, OSError):
        raise BitallocError("TARGET", missing) from None


def _artifact_root(uri: str, experiment: str) -> Optional[str]:
    """Artifacts of a sqlite store live beside its file, not in whatever directory the job ran from."""
    if not uri.startswith("sqlite:///"):
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment)
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / slug).as_uri()


def experiment_id(mlflow_client, uri: str, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # the kind tag makes the MLflow UI open the experiment on its runs table, not the GenAI overview
    return mlflow_client.create_experiment(name, artifact_location=_artifact_root(uri, name),
                                           tags={"mlflow.experimentKind": "custom_model_development"})


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


def _metrics(values: dict[str, float]) -> list:
    from mlflow.entities import Metric

    return [Metric(k, float(v), 0, 0) for k, v in values.items()]


class Tracker:
    """One job's MLflow parent run. Every call is guarded: a failing store warns once and is then ignored."""

    def __init__(self, uri: str, console: Console):
        self.uri, self.console = uri, console
        self.client = None
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.failed = False

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as exc:  # any store failure: connection, permissions, schema, bad URI
            self.failed = True
            self.console.print(f"[yellow]tracking off: {what} failed on {self.uri} ({first_line(exc)}); "
                               f"the job goes on and keeps its local results[/yellow]")
            return None

    def start(self, experiment: str, run_name: str, params: dict, tags: dict[str, str],
              run_id: Optional[str] = None) -> Optional[str]:
        """Open the parent run, or reopen `run_id` (a resumed job). Returns the run id, None if tracking failed."""

        def go():
            from mlflow.entities import Param

            with store_lock(self.uri):  # two jobs creating one sqlite store at once: one creates, the other waits
                self.client = client(self.uri)
                self.client.search_experiments(max_results=1)
            if run_id is not None:
                run = self.client.get_run(run_id)
                self.experiment_id, self.run_id = run.info.experiment_id, run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            self.experiment_id = experiment_id(self.client, self.uri, experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={KIND_TAG: "job", **tags})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in _flatten(params).items()])
            return self.run_id

        return self.guard("starting the run", go)

    def finish(self, front: Front, results: Path) -> None:
        """Log the job's metrics, one child run per measured point, the result folder; mark the run finished."""

        def go():
            from mlflow.entities import Param, RunTag

            ref, m = front.reference, front.metric.metric()
            times: dict[str, float] = {}  # stages of one kind summed (one quantize stage per method)
            for stage, s in front.timings_s.items():
                key = f"time_{stage.split()[0]}_s"
                times[key] = times.get(key, 0.0) + s
            self.client.log_batch(self.run_id, metrics=_metrics({f"fp_{m.quality}": ref.quality, "fp_mib": ref.mib,
                                                                 "front_size": front.solver.front_size, **times}))
            for p in front.mixed + front.uniform:
                child = self.client.create_run(self.experiment_id, run_name=p.label,
                                               tags={PARENT_TAG: self.run_id, KIND_TAG: p.kind})
                cid = child.info.run_id
                values = {k: getattr(p, k) for k in POINT_METRICS}
                self.client.log_batch(
                    cid, metrics=_metrics({**values, m.loss: p.loss, m.quality: p.quality}),
                    params=[Param("label", p.label), Param("config", p.config)],
                    tags=[RunTag("bitalloc.config", p.config)],
                )
                self.client.log_artifact(cid, str(results / p.config), "config")
                bitmap = results / "plots" / "bitmaps" / (Path(p.config).stem + ".png")
                if bitmap.is_file():
                    self.client.log_artifact(cid, str(bitmap), "plots")
                self.client.set_terminated(cid, "FINISHED")
            self.client.log_artifacts(self.run_id, str(results), "results")
            self.client.set_terminated(self.run_id, "FINISHED")

        if self.run_id is not None:
            self.guard("logging the results", go)

    def fail(self) -> None:
        if self.run_id is not None:
            self.guard("marking the run failed", lambda: self.client.set_terminated(self.run_id, "FAILED"))

    def info(self) -> dict:
        """What the front document records, so `export` and `ui` can find the run again."""
        if self.run_id is None or self.failed:
            return {}
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}



def log_runtime_points(front: Front, points: list, results: Path, console: Console) -> None:
    """`bitalloc verify`'s results in the job's run: a child run per runtime point (the runtime's metrics, its file's
    bytes and hash) and the updated front.json and front plot among the parent's results. A failing store warns."""
    from mlflow.entities import Param, RunTag

    info, m = front.tracking, front.metric.metric()
    tracker = Tracker(info.uri, console)

    def go():
        tracker.client = client(info.uri)
        for p in points:
            values = {m.loss: p.loss, m.quality: p.quality, "mib": p.mib, "bytes": p.bytes,
                      "stored_layer_bytes": p.stored_layer_bytes, "file_bytes": p.file_bytes,
                      **{k: v for k, v in p.details.items()}}
            if p.bitalloc_loss is not None:
                values[f"bitalloc_{m.loss}"] = p.bitalloc_loss
                values[f"{m.loss}_rel_diff"] = p.loss_rel_diff or 0
            if p.counted_layer_bytes is not None:
                values["counted_layer_bytes"] = p.counted_layer_bytes
            child = tracker.client.create_run(info.experiment_id, run_name=f"{p.runtime}: {p.label}",
                                              tags={PARENT_TAG: info.run_id, KIND_TAG: "runtime",
                                                    "bitalloc.runtime": p.runtime, "bitalloc.runtime_kind": p.kind})
            tracker.client.log_batch(child.info.run_id, metrics=_metrics(values),
                                     params=[Param("runtime", p.runtime), Param("label", p.label),
                                             Param("file_sha256", p.file_sha256)] +
                                            ([Param("config", p.config)] if p.config else []),
                                     tags=[RunTag("bitalloc.config", p.config)] if p.config else [])
            tracker.client.set_terminated(child.info.run_id, "FINISHED")
        tracker.client.log_artifact(info.run_id, str(results / "front.json"), "results")
        for figure in ("front.png", "dashboard.html"):
            if (results / "plots" / figure).is_file():
                tracker.client.log_artifact(info.run_id, str(results / "plots" / figure), "results/plots")

    tracker.guard("logging the runtime's results", go)
