"""Where a job's evaluations run: an embedded local Ray (the default), or an existing cluster.

The embedded Ray is started by the job itself on loopback, with one worker per `threads_per_worker`
CPUs, and stopped when the job ends. `address` (or RAY_ADDRESS) names a running cluster instead; it
is probed with a TCP connect first, so an unreachable address fails within `CONNECT_TIMEOUT_S`
instead of hanging.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from bitalloc.errors import BitallocError

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


@contextmanager
def ray_session(address: str | None, cpus: int):
    """Yield a description of where Ray runs; shut down what this call started (only that)."""
    import ray
    import ray._private.ray_constants as ray_constants

    # Ray reads the zero-copy switch when first imported; if it was imported before bitalloc set it,
    # set it for this process too, or every worker would hold private copies of the model and cache
    ray_constants.RAY_ENABLE_ZERO_COPY_TORCH_TENSORS = True
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        probe(address, "run.address", 6379)
        ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=False)
        where = f"Ray cluster at {address}"
    else:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": RAY_ENV})
        where = f"embedded Ray on this machine ({cpus} CPUs)"
    try:
        yield where
    finally:
        ray.shutdown()
