"""One way to connect to Ray, or to start a local instance: `connect(...)`.

    from cluster.ray_session import connect
    started = connect(num_cpus=2, env_vars={"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})
    ...
    if started:
        ray.shutdown()

The address: the `address` argument, else `RAY_ADDRESS` (a running cluster, e.g. under `ray job submit`), else
"local" — always a fresh single-node instance, never a cluster that some other `ray start` left on this host.
Connecting to a running cluster ignores `num_cpus` and `dashboard` (the cluster has its own).
Importing this module does not import Ray; pipelines/, jobs/ and the cluster code share it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from cluster import ClusterError
from cluster.procs import stop_descendants

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_TEXT = "timed out during startup"  # Ray waits a fixed 30 s for its raylet; a loaded host misses it


def connect(address: str | None = None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
            dashboard: bool | None = None, log_to_driver: bool = True, configure_logging: bool = True,
            start_attempts: int = 1, pin_gcs_address: bool = False) -> bool:
    """Connect to (or start) Ray unless this process already is; True if this call did (then the caller owns
    `ray.shutdown()`), False if Ray was already initialised.

    env_vars: environment of every Ray worker (the job's runtime_env).
    dashboard: start the dashboard of a local instance (None: Ray's default, on with ray[default]).
    start_attempts: how often a local start that timed out is tried; with more than one, a failed start also
    stops every process below this one (the half-started node's), so use it only in a process that has no
    children of its own to keep.
    pin_gcs_address: start the local GCS on a known free port and hand its address to every worker as
    RAY_ADDRESS (Ray Train's placement-group cleaner asks the state API for "the" cluster and, with another Ray
    on the host, gives up and leaks the placement groups of the trials Tune stops early).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    env = dict(env_vars or {})
    common: dict[str, Any] = {"log_to_driver": log_to_driver, "configure_logging": configure_logging,
                              "runtime_env": {"env_vars": env} if env or pin_gcs_address else None}
    if address != "local":
        try:
            ray.init(address=address, **common)
        except ConnectionError as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address} ({e}); is it up (`ray status`, "
                               "`h2ot cluster status`)? A cluster with token authentication (Ray's default) also "
                               "needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH in this environment (for h2ot "
                               "cluster: source <state-dir>/env.sh)") from None
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for attempt in range(1, start_attempts + 1):
        if pin_gcs_address:
            port = free_port()
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            env["RAY_ADDRESS"] = f"{node_ip_address()}:{port}"  # `common` holds this same dict
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, **common)
            break
        except Exception as e:  # noqa: BLE001 - only a startup timeout is retried; the rest is raised
            ray.shutdown()
            if start_attempts > 1:  # the half-started node's GCS, dashboard and monitors are ours and would linger
                stop_descendants()
            if STARTUP_TIMEOUT_TEXT not in str(e) or attempt == start_attempts:
                raise
            log.warning("local Ray did not start in time (attempt %d of %d); retrying", attempt, start_attempts)
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    if pin_gcs_address and ray.get_runtime_context().gcs_address != env["RAY_ADDRESS"]:
        log.warning("local Ray's GCS is at %s, not %s: stopped trials may leak their workers",
                    ray.get_runtime_context().gcs_address, env["RAY_ADDRESS"])
    return True


def node_ip_address() -> str:
    """The address a local Ray node publishes (Ray turns 127.0.0.1 into the host's interface address)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
