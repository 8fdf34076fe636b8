"""Where a job's evaluations run: an embedded local Ray (the default), or an existing cluster.

The embedded Ray is started by the job itself on loopback, with one worker per `threads_per_worker`
CPUs, and stopped when the job ends. `address` (or RAY_ADDRESS) names a running cluster instead; it
is probed with a TCP connect first, so an unreachable address fails within `CONNECT_TIMEOUT_S`
instead of hanging.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from bitalloc.errors import BitallocError, first_line

CONNECT_TIMEOUT_S = 5.0
RAY_ENV = {
    # torch tensors from the object store are mapped, not copied, into each worker (read-only use)
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    # keep the embedded cluster on loopback
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
# Ray reads these when it is first imported, so they are set before any bitalloc module imports it.
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)


def probe(address: str, field: str, default_port: int) -> tuple[str, int]:
    """host, port of an address such as 127.0.0.1:6379, ray://host:10001 or http://host:8265, reachable within the timeout."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or default_port
    if not host:
        raise BitallocError(field, f"{address!r} is not an address; use HOST:PORT, e.g. 127.0.0.1:6379")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return host, port
    except OSError as exc:
        raise BitallocError(field, f"cannot reach {address!r} within {CONNECT_TIMEOUT_S:.0f} s ({exc.strerror or exc})") from None


def check_gpus(gpus: float, field: str = "run.gpus_per_worker") -> None:
    """Refuse at once a job that asks this machine for GPUs it does not have (Ray would wait for them forever)."""
    if gpus <= 0:
        return
    import torch

    have = torch.cuda.device_count()
    if have < gpus:
        raise BitallocError(field, f"the workers need {gpus:g} GPUs and this machine has {have}; set it to 0 "
                                   f"(CPU workers) or run on a cluster with GPUs (--address)")


@contextmanager
def native_logs_to(log: Path | None):
    """Send what native code writes to stderr (Ray's core worker, gRPC) to LOG instead of the terminal, while
    Python's own stderr (progress, errors) keeps the terminal; None leaves everything on the terminal."""
    if log is None:
        yield
        return
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        python_on_fd2 = False  # stderr is captured (tests, a pipe object): only fd 2 itself moves
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1) if python_on_fd2 else None
    previous = sys.stderr
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 2)
    if terminal is not None:
        sys.stderr = terminal
    try:
        yield
    finally:
        if terminal is not None:
            terminal.flush()
            sys.stderr = previous
            terminal.close()
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def ray_session(address: str | None, cpus: int, gpus: float = 0.0, log: Path | None = None):
    """Yield a description of where Ray runs; shut down what this call started (only that). A cluster without
    `gpus` GPUs is refused at once; Ray's own log lines go to `log` (None: to the terminal)."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._private.tensor_serialization_utils import ZeroCopyTensorsWarning

    # Ray reads the zero-copy switch when first imported; if it was imported before bitalloc set it,
    # set it for this process too, or every worker would hold private copies of the model and cache
    ray_constants.RAY_ENABLE_ZERO_COPY_TORCH_TENSORS = True
    # workers only read the shared tensors, which is what zero-copy requires
    warnings.filterwarnings("ignore", category=ZeroCopyTensorsWarning)
    address = address or os.environ.get("RAY_ADDRESS")
    with native_logs_to(log):
        if address:
            probe(address, "run.address", 6379)
            try:
                ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=False,
                         logging_level="ERROR")
            except Exception as exc:  # the port answers, but not as a Ray cluster Ray can join
                raise BitallocError("run.address", f"{address} answers but Ray cannot join it as a cluster "
                                                   f"({type(exc).__name__}: {first_line(exc, 160)})") from None
            where = f"Ray cluster at {address}"
        else:
            check_gpus(gpus)
            ray.init(address="local", num_cpus=cpus, num_gpus=int(gpus + 0.999) if gpus else None,
                     include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": RAY_ENV},
                     logging_level="ERROR")
            where = f"embedded Ray on this machine ({cpus} CPUs)"
        try:
            have = ray.cluster_resources().get("GPU", 0)
            if address and gpus and have < gpus:
                raise BitallocError("run.gpus_per_worker", f"the workers need {gpus:g} GPUs and the Ray cluster "
                                                           f"has {have:g}; set it to 0 or add GPU nodes")
            yield where
        finally:
            ray.shutdown()
