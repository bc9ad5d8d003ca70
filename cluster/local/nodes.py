"""Starting and stopping the local cluster: `up`, `down`, `restart_node`, and what they are made of.

Everything `up` starts carries the environment marker `H2OT_CLUSTER_ID=<id>`, and every namespace, link and
process is recorded in the state file before it is made, so `down` stops exactly what was started (by process
id checked against its start time, then by the marker) even after `up` itself crashed half-way. Token
authentication stays on: the cluster has its own token file handed to Ray through `RAY_AUTH_TOKEN_PATH`, so it
never touches, nor collides with, another Ray in `~/.ray`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import ClusterError
from cluster.local.network import (
    DEFAULT_SUBNET,
    NS_IFNAME,
    can_use_netns,
    check_port_free,
    setup_network,
    teardown_network,
)
from cluster.local.state import (
    MARKER,
    ClusterState,
    NodeState,
    load_state,
    make_state_dir,
    save_state,
    state_path,
    write_env_file,
    write_token,
)
from cluster.procs import has_marker, is_alive, send_signal, start_ticks
from cluster.procs import marked_pids as _marked

log = logging.getLogger("h2ot.cluster")

OBJECT_STORE_BYTES = 200 * 1024 * 1024  # tiny clusters: the default (30% of RAM per node) is far too much here
START_TIMEOUT_S = 90.0
NODE_START_ATTEMPTS = 5
STOP_GRACE_S = 10.0
RAY_WORKER_PORTS = (10002, 19999)  # `ray start`'s default --min-worker-port / --max-worker-port


# --------------------------------------------------------------------------------------------- processes
def marked_pids(cluster_id: str) -> list[int]:
    """Every live process started by cluster `cluster_id` (Ray's workers and helpers inherit the marker)."""
    return _marked(MARKER, cluster_id)


def stop_processes(state: ClusterState, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM what the cluster started (recorded pids, then all carrying its marker); SIGKILL the rest."""
    recorded = [(n.pid, n.start_ticks) for n in reversed(state.nodes)]
    recorded.append((state.mlflow_pid, state.mlflow_start_ticks))
    first = [pid for pid, ticks in recorded if is_alive(pid, ticks)]
    send_signal(first, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    stopped: set[int] = set(first)
    while time.monotonic() < deadline:
        left = marked_pids(state.id)
        stopped.update(left)
        if not left:
            break
        # `ray start --block` stops its node on SIGTERM; once it is gone (or half the grace time is), whatever
        # still carries the marker (orphans after a crash, stuck workers) gets its own SIGTERM.
        leaders_gone = not any(is_alive(pid, ticks) for pid, ticks in recorded)
        if leaders_gone or time.monotonic() > deadline - grace_s / 2:
            send_signal(left, signal.SIGTERM)
        time.sleep(0.3)
    left = marked_pids(state.id)
    if left:
        log.warning("SIGKILL to %d process(es) that ignored SIGTERM: %s", len(left), left)
        send_signal(left, signal.SIGKILL)
        for _ in range(50):
            if not marked_pids(state.id):
                break
            time.sleep(0.1)
    return len(stopped)


def _node_env(state: ClusterState) -> dict[str, str]:
    env = dict(os.environ)
    env.update(state.client_env())
    env[MARKER] = state.id
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # job drivers run `python`
    if state.mlflow_host:  # jobs on the cluster log to its MLflow server unless their runtime_env says otherwise
        env["MLFLOW_TRACKING_URI"] = state.mlflow_url
    if state.mode == "netns":
        # Every namespace shares the host's name, which resolves to loopback: torch.distributed (gloo) would then
        # announce 127.0.0.1 to the other node. Name the namespace's own interface instead.
        env["GLOO_SOCKET_IFNAME"] = NS_IFNAME
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[int, int | None]:
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid, start_ticks(proc.pid)


def node_temp_dir(state: ClusterState, node: NodeState) -> str:
    """Each node's own Ray temp dir (sessions, logs, sockets), as on separate hosts. With one shared folder every
    node's log monitor tailed the worker logs of all nodes and published each line again under its own node's
    address: on head + 2 workers a task's one print reached the driver 3 times, 2 of them with a wrong `ip=`."""
    return str(Path(str(state.ray_temp_dir)) / node.name)


def _ray_cmd(state: ClusterState, node: NodeState, head: bool) -> list[str]:
    ray = str(Path(sys.executable).parent / "ray")
    cpus = state.head_num_cpus if head else state.cpus_per_node
    cmd = [ray, "start", "--block", f"--num-cpus={cpus:g}", "--num-gpus=0",
           f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={node_temp_dir(state, node)}",
           "--disable-usage-stats"]
    if node.ip:
        cmd.append(f"--node-ip-address={node.ip}")
    if head:
        cmd += ["--head", f"--port={state.gcs_port}", "--include-dashboard=true",
                f"--dashboard-host={state.dashboard_host}", f"--dashboard-port={state.dashboard_port}"]
    else:
        cmd.append(f"--address={state.gcs_address}")
    if node.netns:
        cmd = ["ip", "netns", "exec", node.netns, *cmd]
    return cmd


def _http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (our own http:// addresses)
        return resp.read()


def alive_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """Alive Ray nodes as the head's dashboard reports them (`node_ip`, `node_id`, `is_head`, `cpus`: the logical
    CPUs Ray schedules tasks on, 0 for a head started with --head-cpus 0; `node_manager_port`: its raylet)."""
    raw = _http_get(f"{state.dashboard_url}/nodes?view=summary", state.auth_headers())
    out = []
    for node in json.loads(raw).get("data", {}).get("summary", []):
        raylet = node.get("raylet", {})
        if raylet.get("state") == "ALIVE":
            out.append({"node_ip": node.get("ip") or raylet.get("nodeManagerAddress"),
                        "node_id": raylet.get("nodeId"), "is_head": bool(raylet.get("isHeadNode")),
                        "cpus": float(raylet.get("resourcesTotal", {}).get("CPU", 0.0)),
                        "node_manager_port": raylet.get("nodeManagerPort")})
    return out


def _wait(what: str, check: Callable[[], Any], timeout_s: float, log_path: str | None,
          died: Callable[[], bool] | None = None) -> None:
    """Poll `check` until it is true; raise with the log's tail after `timeout_s`, or at once when `died()`."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, urllib.error.URLError) as e:
            last = e
        if died is not None and died():
            raise ClusterError(f"{what} exited during startup; log {log_path}:\n{_log_tail(log_path)}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout_s:.0f} s ({last}); log {log_path}:\n"
                       f"{_log_tail(log_path)}")


def _log_tail(log_path: str | None, lines: int = 15) -> str:
    if not log_path or not Path(log_path).exists():
        return ""
    return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])


def check_ports_outside_worker_range(gcs_port: int, dashboard_port: int) -> None:
    """Ray gives its workers the ports 10002-19999 on every node: a GCS or dashboard port in there makes
    `ray start` fail (after the full start timeout, seen only in the node's log). Refuse it up front."""
    for port, option in ((gcs_port, "--gcs-port"), (dashboard_port, "--dashboard-port")):
        if RAY_WORKER_PORTS[0] <= port <= RAY_WORKER_PORTS[1]:
            low, high = RAY_WORKER_PORTS
            raise ClusterError(f"{option} {port} lies in the ports Ray gives its workers ({low}-{high}); "
                               f"pick one below {low - 1} or above {high}")


# --------------------------------------------------------------------------------------------- start
def start_node(state: ClusterState, node: NodeState, head: bool) -> None:
    """Start one Ray node (`ray start --block` in its namespace) and record its pid."""
    node.log = str(Path(state.state_dir) / "logs" / f"ray-{node.name}.log")
    node.attempts += 1
    node.pid, node.start_ticks = _spawn(_ray_cmd(state, node, head), _node_env(state), Path(node.log))
    save_state(state)


def start_mlflow(state: ClusterState) -> None:
    root = Path(state.state_dir) / "mlflow"
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    env = _node_env(state)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # the job runner would take ~2.3 GB instead of ~0.5 GB
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", str(state.mlflow_host),
           "--port", str(state.mlflow_port), "--workers", "1",
           # The UI calls its own API from this origin; MLflow's default allows only localhost origins.
           "--cors-allowed-origins", state.mlflow_url]
    log_path = Path(state.state_dir) / "logs" / "mlflow.log"
    state.mlflow_pid, state.mlflow_start_ticks = _spawn(cmd, env, log_path)
    save_state(state)


def up(state_dir: Path, workers: int = 1, cpus_per_node: float = 1.0, gcs_port: int = 6379,
       dashboard_port: int = 8265, mlflow_port: int = 5000, subnet: str = DEFAULT_SUBNET, netns: bool | None = None,
       timeout_s: float = START_TIMEOUT_S, head_cpus: float | None = None) -> ClusterState:
    """Start head + `workers` worker nodes + MLflow; on any failure stop everything started and re-raise.

    head_cpus: logical CPUs of the head (None: `cpus_per_node`, as every worker). With 0 the head schedules no
    CPU task: it keeps the GCS, dashboard and job drivers, and the workers' CPUs are all the cluster has.
    """
    state_dir = Path(state_dir).absolute()
    old = load_state(state_dir)
    if old is not None:
        if marked_pids(old.id):
            raise ClusterError(f"a cluster is already running from {state_dir} (id {old.id}); "
                               f"run `h2ot cluster down --state-dir {state_dir}` first")
        log.info("cleaning up a stale cluster state (id %s) in %s", old.id, state_dir)
        down(state_dir)
    use_netns = can_use_netns() if netns is None else netns
    if use_netns and not can_use_netns():
        raise ClusterError("--netns needs root and the `ip` tool; run as root or pass --no-netns")
    if workers < 0:
        raise ClusterError(f"--workers must be >= 0, got {workers}")
    if cpus_per_node < 0 or (head_cpus is not None and head_cpus < 0):
        raise ClusterError(f"CPUs must be >= 0, got --cpus-per-node {cpus_per_node:g}, --head-cpus {head_cpus}")
    if head_cpus == 0 and (workers == 0 or cpus_per_node == 0):
        raise ClusterError("--head-cpus 0 leaves the cluster without CPUs for tasks: add --workers (with "
                           "--cpus-per-node > 0) or give the head CPUs")
    check_ports_outside_worker_range(gcs_port, dashboard_port)
    make_state_dir(state_dir)
    state = ClusterState(id=secrets.token_hex(3), mode="netns" if use_netns else "host", state_dir=str(state_dir),
                         cpus_per_node=cpus_per_node, gcs_port=gcs_port, dashboard_port=dashboard_port,
                         mlflow_port=mlflow_port, subnet=subnet if use_netns else None, head_cpus=head_cpus)
    # Token auth: this cluster's own token, never ~/.ray/auth_token of whoever runs it.
    state.token_path = str(write_token(state_dir))
    # Unix socket paths must stay short (<108 bytes): Ray's temp dir lives under /tmp, not the state dir.
    state.ray_temp_dir = tempfile.mkdtemp(prefix=f"h2ot-ray-{state.id}-", dir="/tmp")
    save_state(state)
    try:
        _start_all(state, ["head", *[f"w{i + 1}" for i in range(workers)]], timeout_s)
        return state
    except BaseException:
        log.error("cluster start failed; stopping what was started")
        down(state_dir)
        raise


def _start_all(state: ClusterState, names: list[str], timeout_s: float) -> None:
    """The network (or host addresses), MLflow, the head, the workers; waits until all answer."""
    if state.mode == "netns":
        setup_network(state, names)
        state.mlflow_host, state.dashboard_host = state.bridge_ip, state.head.ip
    else:
        state.mlflow_host = state.dashboard_host = "127.0.0.1"  # the GCS still binds the host address
        check_port_free("0.0.0.0", state.gcs_port, "Ray GCS", "--gcs-port")
        check_port_free("127.0.0.1", state.dashboard_port, "Ray dashboard / Jobs API", "--dashboard-port")
        from cluster.ray_session import node_ip_address

        ip = node_ip_address()
        state.nodes = [NodeState(name=n, ip=ip) for n in names]
    check_port_free(state.mlflow_host, state.mlflow_port, "MLflow server", "--mlflow-port")
    save_state(state)
    start_mlflow(state)
    start_node(state, state.head, head=True)
    _wait("the Ray head", lambda: _http_get(f"{state.dashboard_url}/api/version", state.auth_headers()),
          timeout_s, state.head.log, died=lambda: not is_alive(state.head.pid, state.head.start_ticks))
    for node in state.nodes[1:]:
        start_node(state, node, head=False)

    def all_nodes_alive() -> bool:
        # `ray start` gives a raylet 30 s (fixed) to register; on a loaded machine that can pass. Restart a
        # worker node whose `ray start` gave up, up to NODE_START_ATTEMPTS times.
        for node in state.nodes[1:]:
            if not is_alive(node.pid, node.start_ticks) and node.attempts < NODE_START_ATTEMPTS:
                log.warning("Ray node %s exited during startup; starting it again", node.name)
                start_node(state, node, head=False)
        return len(alive_nodes(state)) >= len(names)

    _wait(f"{len(names)} Ray node(s)", all_nodes_alive, timeout_s, state.nodes[-1].log)
    _wait("the MLflow server", lambda: _http_get(f"{state.mlflow_url}/health"), timeout_s,
          str(Path(state.state_dir) / "logs" / "mlflow.log"))
    state.ready = True
    save_state(state)
    write_env_file(state)


def restart_node(state_dir: Path, name: str, timeout_s: float = START_TIMEOUT_S) -> ClusterState:
    """Start worker node `name` again (after it died or was killed), in its namespace, with its address."""
    state = load_state(Path(state_dir).absolute())
    if state is None:
        raise ClusterError(f"no cluster in {state_dir}")
    nodes = {n.name: n for n in state.nodes}
    if name not in nodes or name == "head":
        raise ClusterError(f"--node must be a worker node of this cluster: {sorted(set(nodes) - {'head'})}")
    node = nodes[name]
    if is_alive(node.pid, node.start_ticks):
        raise ClusterError(f"node {name} is running (pid {node.pid}); nothing to restart")
    if node.netns:  # leftovers of the dead node (its `ray start` normally takes them down with it)
        res = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True)
        send_signal([int(p) for p in res.stdout.split() if has_marker(int(p), MARKER, state.id)], signal.SIGKILL)
    before = {n["node_id"] for n in alive_nodes(state)}
    node.attempts = 0
    start_node(state, node, head=False)
    _wait(f"Ray node {name}",
          lambda: any(n["node_ip"] == node.ip and n["node_id"] not in before for n in alive_nodes(state)),
          timeout_s, node.log)
    return state


# --------------------------------------------------------------------------------------------- drivers
def driver_command(state: ClusterState, argv: list[str]) -> list[str]:
    """`argv` as a Ray driver of this cluster: on the head node (in its namespace, in netns mode).

    A driver in the host's namespace connects (`ray.init` finds the head through the files all nodes share on
    this machine) but announces the head's address while listening on the host's: the worker nodes' calls back
    to it (fetching an object it owns, e.g. a Ray Data block) go to the head's namespace and nothing answers,
    so such a job hangs without an error. On the head it is what `ray job submit` does, minus the upload.
    """
    if state.mode == "netns":
        return ["ip", "netns", "exec", state.head.netns, *argv]
    return list(argv)


def driver_env(state: ClusterState, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a driver started by `driver_command`: `base` (default: this process's) plus the cluster's
    GCS address as RAY_ADDRESS, its token, its MLflow server, and the marker (so `down` stops a driver left
    running)."""
    env = dict(os.environ if base is None else base)
    env.update(state.client_env())
    env["RAY_ADDRESS"] = state.gcs_address
    env[MARKER] = state.id
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`: this one's
    if state.mlflow_host:
        env["MLFLOW_TRACKING_URI"] = state.mlflow_url
    return env


_STORE_STATS = """
import json, sys
from ray._private.internal_api import node_stats
out = {}
for ip, port in json.loads(sys.argv[1]):
    s = node_stats(ip, port, include_memory_info=False).store_stats
    out[ip] = {"created_bytes": s.cumulative_created_bytes, "spilled_bytes": s.spilled_bytes_total,
               "restored_bytes": s.restored_bytes_total}
print(json.dumps(out))
"""


def store_stats(state: ClusterState) -> dict[str, dict[str, int]]:
    """Per node address, its object store's counters since the node started, asked of each raylet now (the
    dashboard's copy lags up to 15 s): created_bytes (objects made there, those pulled from another node
    included), spilled_bytes and restored_bytes (to and from disk when the store was full). Asked from a
    short-lived process that carries the cluster's token, so this process's Ray stays as it is."""
    nodes = [[n["node_ip"], n["node_manager_port"]] for n in alive_nodes(state)]
    proc = subprocess.run([sys.executable, "-c", _STORE_STATS, json.dumps(nodes)], env=driver_env(state),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ClusterError(f"reading the nodes' object-store counters failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- stop
def down(state_dir: Path) -> int:
    """Stop everything the cluster in `state_dir` started; return the number of processes stopped."""
    state_dir = Path(state_dir).absolute()
    state = load_state(state_dir)
    if state is None:
        return 0
    n = stop_processes(state)
    if state.mode == "netns":
        teardown_network(state)
    if state.ray_temp_dir and Path(state.ray_temp_dir).name.startswith("h2ot-ray-"):
        shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    state_path(state_dir).unlink(missing_ok=True)
    return n
