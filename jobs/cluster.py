"""`h2ot cluster up|down|status`: a multi-node Ray cluster and an MLflow server on one machine.

As root, each Ray node (a head and N workers, separate `ray start` processes) lives in its own network
namespace, joined to the host by veth pairs on a private bridge, so the nodes are separate hosts with their
own addresses:

    host (root namespace)   bridge h2ot<id>  10.213.7.1   <- MLflow server binds here
    namespace h2ot-<id>-head              10.213.7.2   <- Ray head: GCS :6379, dashboard + Jobs API :8265
    namespace h2ot-<id>-w1                10.213.7.3   <- Ray worker node
    ...

Without root (or with `--no-netns`) the nodes are plain host processes and MLflow binds 127.0.0.1.

Everything that `up` starts carries the environment marker `H2OT_CLUSTER_ID=<id>`, and every namespace, link
and process is written to `<state-dir>/state.json` *before* it is made, so `down` stops exactly what was
started (by process id, checked against the marker) even after `up` itself crashed half-way. Token
authentication stays on: the cluster has its own token file (`<state-dir>/auth_token`, mode 0600) handed to
Ray via `RAY_AUTH_TOKEN_PATH`, so it never touches, nor collides with, another Ray in `~/.ray`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs._common import UserError, friendly_errors, setup_logging

log = logging.getLogger("h2ot.cluster")

MARKER = "H2OT_CLUSTER_ID"
STATE_FILE = "state.json"
DEFAULT_STATE_DIR = Path.home() / ".h2ot" / "cluster"
DEFAULT_SUBNET = "10.213.7.0/24"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # tiny clusters: the default (30% of RAM per node) is far too much here
START_TIMEOUT_S = 90.0
NODE_START_ATTEMPTS = 5
STOP_GRACE_S = 10.0
NS_IFNAME = "eth0"  # the node's interface inside its namespace


# --------------------------------------------------------------------------------------------- state
@dataclass
class NodeState:
    name: str  # "head", "w1", "w2", ...
    ip: str | None  # None in host mode until Ray picks one
    netns: str | None = None
    pid: int | None = None
    start_ticks: int | None = None  # /proc/<pid>/stat field 22: guards against pid reuse
    log: str | None = None
    attempts: int = 0


@dataclass
class ClusterState:
    """What `up` made, written before each thing is made (so a crash leaves a complete list for `down`)."""

    id: str
    mode: str  # "netns" or "host"
    state_dir: str
    cpus_per_node: float
    gcs_port: int
    dashboard_port: int
    mlflow_port: int
    subnet: str | None = None
    bridge: str | None = None
    bridge_ip: str | None = None
    links: list[str] = field(default_factory=list)  # host-side veth ends
    namespaces: list[str] = field(default_factory=list)
    nodes: list[NodeState] = field(default_factory=list)
    dashboard_host: str | None = None  # the head's address (netns) or 127.0.0.1 (host mode)
    mlflow_host: str | None = None
    mlflow_pid: int | None = None
    mlflow_start_ticks: int | None = None
    ray_temp_dir: str | None = None
    token_path: str | None = None
    ready: bool = False

    @property
    def head(self) -> NodeState:
        return self.nodes[0]

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.dashboard_host}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{self.gcs_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.mlflow_host}:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """Environment a client on this host needs to talk to the cluster (token auth)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that carry the cluster's token: for this module's own requests and for in-process Ray
        clients (`JobSubmissionClient`, `StateApiClient`). Ray reads its auth mode once per process, so setting
        `client_env()` after an earlier `ray.init()` (say, with auth disabled) is not enough."""
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"} if self.token_path else {}


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def save_state(state: ClusterState) -> None:
    path = state_path(Path(state.state_dir))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)  # atomic: a crash never leaves half a state file


def load_state(state_dir: Path) -> ClusterState | None:
    path = state_path(state_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        nodes = [NodeState(**n) for n in data.pop("nodes", [])]
        return ClusterState(**data, nodes=nodes)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: unreadable cluster state ({e}); remove it after checking nothing runs") from None


# --------------------------------------------------------------------------------------------- processes
def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the comm field


def _has_marker(pid: int, cluster_id: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER}={cluster_id}".encode() in env.split(b"\0")


def marked_pids(cluster_id: str) -> list[int]:
    """Every live process started by cluster `cluster_id` (Ray's workers and helpers inherit the marker)."""
    own = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != own and _has_marker(int(entry.name), cluster_id):
            pids.append(int(entry.name))
    return sorted(pids)


def _alive(pid: int | None, ticks: int | None) -> bool:
    """`pid` runs, is not a zombie, and is the process recorded (same start time, so not a reused pid)."""
    if pid is None or ticks is None or _start_ticks(pid) != ticks:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(state: ClusterState, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM what the cluster started (recorded pids, then all carrying its marker); SIGKILL the rest."""
    recorded = [(n.pid, n.start_ticks) for n in reversed(state.nodes)]
    recorded.append((state.mlflow_pid, state.mlflow_start_ticks))
    first = [pid for pid, ticks in recorded if _alive(pid, ticks)]
    _signal(first, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    stopped: set[int] = set(first)
    while time.monotonic() < deadline:
        left = marked_pids(state.id)
        stopped.update(left)
        if not left:
            break
        # `ray start --block` stops its node on SIGTERM; once it is gone (or half the grace time is), whatever
        # still carries the marker (orphans after a crash, stuck workers) gets its own SIGTERM.
        leaders_gone = not any(_alive(pid, ticks) for pid, ticks in recorded)
        if leaders_gone or time.monotonic() > deadline - grace_s / 2:
            _signal(left, signal.SIGTERM)
        time.sleep(0.3)
    left = marked_pids(state.id)
    if left:
        log.warning("SIGKILL to %d process(es) that ignored SIGTERM: %s", len(left), left)
        _signal(left, signal.SIGKILL)
        for _ in range(50):
            if not marked_pids(state.id):
                break
            time.sleep(0.1)
    return len(stopped)


# --------------------------------------------------------------------------------------------- network
def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"`{shlex.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def subnet_in_use(subnet: str) -> str | None:
    """The device that already routes an address range overlapping `subnet`, else None."""
    net = ipaddress.ip_network(subnet)
    res = subprocess.run(["ip", "-j", "route", "show", "table", "all"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    for route in json.loads(res.stdout or "[]"):
        dst = route.get("dst", "")
        if dst in ("default", "") or ":" in dst or route.get("type") in ("local", "broadcast"):
            continue
        try:
            other = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if other.version == 4 and net.overlaps(other) and other.prefixlen > 0:
            return route.get("dev", "?")
    return None


def setup_network(state: ClusterState, names: list[str]) -> None:
    """Bridge on the host + one namespace per node with a veth into the bridge. Records before creating."""
    net = ipaddress.ip_network(state.subnet)
    hosts = list(net.hosts())
    if len(hosts) < len(names) + 1:
        raise UserError(f"--subnet {state.subnet} is too small for {len(names)} nodes")
    dev = subnet_in_use(state.subnet)
    if dev is not None:
        raise UserError(f"--subnet {state.subnet} overlaps a route of device {dev}; pick another private /24")
    state.bridge, state.bridge_ip = f"h2ot{state.id}", str(hosts[0])
    save_state(state)
    _run(["ip", "link", "add", state.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{state.bridge_ip}/{net.prefixlen}", "dev", state.bridge])
    _run(["ip", "link", "set", state.bridge, "up"])
    for i, name in enumerate(names):
        ns, host_end, ns_end, ip = f"h2ot-{state.id}-{name}", f"h2v{state.id}{i}", NS_IFNAME, str(hosts[i + 1])
        state.namespaces.append(ns)
        state.links.append(host_end)
        state.nodes.append(NodeState(name=name, ip=ip, netns=ns))
        save_state(state)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", f"h2p{state.id}{i}"])
        _run(["ip", "link", "set", f"h2p{state.id}{i}", "netns", ns])
        _run(["ip", "-n", ns, "link", "set", f"h2p{state.id}{i}", "name", ns_end])
        _run(["ip", "link", "set", host_end, "master", state.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", ns_end])
        _run(["ip", "-n", ns, "link", "set", ns_end, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def teardown_network(state: ClusterState) -> None:
    """Delete the namespaces and links this cluster recorded (missing ones are fine)."""
    existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    for ns in state.namespaces:
        if ns in existing:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for link in [*state.links, state.bridge]:
        if link and Path(f"/sys/class/net/{link}").exists():
            subprocess.run(["ip", "link", "del", link], capture_output=True)


# --------------------------------------------------------------------------------------------- ports
def check_port_free(host: str, port: int, what: str, option: str) -> None:
    """Raise a UserError naming the port, the service and the option to change it, if `host:port` is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "taken"
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(
                f"port {port} on {host} is taken ({what}: {e.strerror}); choose another with {option} "
                f"or stop what listens there (`ss -ltnp 'sport = :{port}'`)"
            ) from None


# --------------------------------------------------------------------------------------------- start
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
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid, _start_ticks(proc.pid)


def _ray_cmd(state: ClusterState, node: NodeState, head: bool) -> list[str]:
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray,
        "start",
        "--block",
        f"--num-cpus={state.cpus_per_node:g}",
        "--num-gpus=0",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--temp-dir={state.ray_temp_dir}",
        "--disable-usage-stats",
    ]
    if node.ip:
        cmd.append(f"--node-ip-address={node.ip}")
    if head:
        cmd += [
            "--head",
            f"--port={state.gcs_port}",
            "--include-dashboard=true",
            f"--dashboard-host={state.dashboard_host}",
            f"--dashboard-port={state.dashboard_port}",
        ]
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
    """Alive Ray nodes as the head's dashboard reports them (`node_ip`, `node_id`, `is_head`)."""
    raw = _http_get(f"{state.dashboard_url}/nodes?view=summary", state.auth_headers())
    summary = json.loads(raw).get("data", {}).get("summary", [])
    out = []
    for node in summary:
        raylet = node.get("raylet", {})
        if raylet.get("state") == "ALIVE":
            out.append(
                {
                    "node_ip": node.get("ip") or raylet.get("nodeManagerAddress"),
                    "node_id": raylet.get("nodeId"),
                    "is_head": bool(raylet.get("isHeadNode")),
                }
            )
    return out


def _wait(what: str, check, timeout_s: float, state: ClusterState, log_path: str | None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.5)
    tail = ""
    if log_path and Path(log_path).exists():
        tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-15:])
    raise UserError(f"{what} did not come up within {timeout_s:.0f} s ({last}); log {log_path}:\n{tail}")


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
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # 0.5 GB instead of 2.3 GB (ECOSYSTEM.md)
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = [
        mlflow,
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        str(state.mlflow_host),
        "--port",
        str(state.mlflow_port),
        "--workers",
        "1",
        # The UI calls its own API from this origin; MLflow's default allows only localhost origins.
        "--cors-allowed-origins",
        state.mlflow_url,
    ]
    log_path = Path(state.state_dir) / "logs" / "mlflow.log"
    state.mlflow_pid, state.mlflow_start_ticks = _spawn(cmd, env, log_path)
    save_state(state)


def up(
    state_dir: Path,
    workers: int = 1,
    cpus_per_node: float = 1.0,
    gcs_port: int = 6379,
    dashboard_port: int = 8265,
    mlflow_port: int = 5000,
    subnet: str = DEFAULT_SUBNET,
    netns: bool | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> ClusterState:
    """Start head + `workers` worker nodes + MLflow; on any failure stop everything started and re-raise."""
    state_dir = Path(state_dir).absolute()
    old = load_state(state_dir)
    if old is not None:
        if marked_pids(old.id):
            raise UserError(
                f"a cluster is already running from {state_dir} (id {old.id}); "
                f"run `h2ot cluster down --state-dir {state_dir}` first"
            )
        log.info("cleaning up a stale cluster state (id %s) in %s", old.id, state_dir)
        down(state_dir)
    use_netns = can_use_netns() if netns is None else netns
    if use_netns and not can_use_netns():
        raise UserError("--netns needs root and the `ip` tool; run as root or pass --no-netns")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    state = ClusterState(
        id=secrets.token_hex(3),
        mode="netns" if use_netns else "host",
        state_dir=str(state_dir),
        cpus_per_node=cpus_per_node,
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        mlflow_port=mlflow_port,
        subnet=subnet if use_netns else None,
    )
    # Token auth: this cluster's own token, never ~/.ray/auth_token of whoever runs it.
    token = Path(state_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    state.token_path = str(token)
    # Unix socket paths must stay short (<108 bytes): Ray's temp dir lives under /tmp, not the state dir.
    state.ray_temp_dir = tempfile.mkdtemp(prefix=f"h2ot-ray-{state.id}-", dir="/tmp")
    save_state(state)
    names = ["head", *[f"w{i + 1}" for i in range(workers)]]
    try:
        if use_netns:
            setup_network(state, names)
            state.mlflow_host, state.dashboard_host = state.bridge_ip, state.head.ip
        else:
            state.mlflow_host = state.dashboard_host = "127.0.0.1"  # the GCS still binds the host address
            check_port_free("0.0.0.0", gcs_port, "Ray GCS", "--gcs-port")
            check_port_free("127.0.0.1", dashboard_port, "Ray dashboard / Jobs API", "--dashboard-port")
            from cluster.ray_session import node_ip_address

            ip = node_ip_address()
            state.nodes = [NodeState(name=n, ip=ip) for n in names]
        check_port_free(state.mlflow_host, mlflow_port, "MLflow server", "--mlflow-port")
        save_state(state)
        start_mlflow(state)
        start_node(state, state.head, head=True)
        _wait(
            "the Ray head",
            lambda: _http_get(f"{state.dashboard_url}/api/version", state.auth_headers()),
            timeout_s,
            state,
            state.head.log,
        )
        for node in state.nodes[1:]:
            start_node(state, node, head=False)

        def all_nodes_alive() -> bool:
            # `ray start` gives a raylet 30 s (fixed) to register; on a loaded machine that can pass. Restart a
            # worker node whose `ray start` gave up, up to NODE_START_ATTEMPTS times.
            for node in state.nodes[1:]:
                if not _alive(node.pid, node.start_ticks) and node.attempts < NODE_START_ATTEMPTS:
                    log.warning("Ray node %s exited during startup; starting it again", node.name)
                    start_node(state, node, head=False)
            return len(alive_nodes(state)) >= len(names)

        _wait(f"{len(names)} Ray node(s)", all_nodes_alive, timeout_s, state, state.nodes[-1].log)
        _wait(
            "the MLflow server",
            lambda: _http_get(f"{state.mlflow_url}/health"),
            timeout_s,
            state,
            str(Path(state.state_dir) / "logs" / "mlflow.log"),
        )
        state.ready = True
        save_state(state)
        write_env_file(state)
        return state
    except BaseException:
        log.error("cluster start failed; stopping what was started")
        down(state_dir)
        raise


def write_env_file(state: ClusterState) -> Path:
    """`source <state-dir>/env.sh` sets what `ray job submit` and MLflow clients need."""
    env = {**state.client_env(), "RAY_ADDRESS": state.dashboard_url, "MLFLOW_TRACKING_URI": state.mlflow_url}
    path = Path(state.state_dir) / "env.sh"
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return path


def restart_node(state_dir: Path, name: str, timeout_s: float = START_TIMEOUT_S) -> ClusterState:
    """Start worker node `name` again (after it died or was killed), in its namespace, with its address."""
    state = load_state(Path(state_dir).absolute())
    if state is None:
        raise UserError(f"no cluster in {state_dir}")
    nodes = {n.name: n for n in state.nodes}
    if name not in nodes or name == "head":
        raise UserError(f"--node must be a worker node of this cluster: {sorted(set(nodes) - {'head'})}")
    node = nodes[name]
    if _alive(node.pid, node.start_ticks):
        raise UserError(f"node {name} is running (pid {node.pid}); nothing to restart")
    if node.netns:  # leftovers of the dead node (its `ray start` normally takes them down with it)
        res = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True)
        left = [int(p) for p in res.stdout.split() if _has_marker(int(p), state.id)]
        _signal(left, signal.SIGKILL)
    before = {n["node_id"] for n in alive_nodes(state)}
    node.attempts = 0
    start_node(state, node, head=False)
    _wait(
        f"Ray node {name}",
        lambda: any(n["node_ip"] == node.ip and n["node_id"] not in before for n in alive_nodes(state)),
        timeout_s,
        state,
        node.log,
    )
    return state


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


# --------------------------------------------------------------------------------------------- report
def submit_hint(state: ClusterState, module: str = "jobs.train", args: str = "--config configs/tiny.yaml") -> str:
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": state.mlflow_url}})
    return (
        f"ray job submit --address {state.dashboard_url} --working-dir . "
        f"--runtime-env-json '{runtime_env}' -- python -m {module} {args}"
    )


def describe(state: ClusterState) -> str:
    lines = [f"h2ot cluster {state.id} ({state.mode} mode, state in {state.state_dir})"]
    for node in state.nodes:
        where = f"netns {node.netns}" if node.netns else "host"
        alive = "running" if _alive(node.pid, node.start_ticks) else "STOPPED"
        lines.append(f"  {node.name:<5} {node.ip or '?':<15} {where:<24} pid {node.pid}  {alive}")
    alive = "running" if _alive(state.mlflow_pid, state.mlflow_start_ticks) else "STOPPED"
    lines += [
        f"  mlflow {state.mlflow_host}:{state.mlflow_port}  pid {state.mlflow_pid}  {alive}",
        "",
        f"Ray GCS:          {state.gcs_address}",
        f"Ray dashboard:    {state.dashboard_url}   (Jobs API)",
        f"MLflow UI:        {state.mlflow_url}",
        "",
        "Client environment (token auth):",
        f"  source {Path(state.state_dir) / 'env.sh'}",
        "Submit a job:",
        f"  {submit_hint(state)}",
        "Open the MLflow UI:",
        f"  xdg-open {state.mlflow_url}   # or: chromium --headless --dump-dom {state.mlflow_url}",
        f"Stop:  h2ot cluster down --state-dir {state.state_dir}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="h2ot cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    for name, text in [
        ("up", "start head + workers + MLflow"),
        ("down", "stop everything `up` started"),
        ("status", "show nodes, addresses and commands"),
        ("restart-node", "start a dead worker node again (e.g. after a failure drill)"),
    ]:
        s = sub.add_parser(name, help=text)
        s.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"where the state, token, logs and MLflow store live (default {DEFAULT_STATE_DIR})",
        )
        s.add_argument("-v", "--verbose", action="store_true")
        if name == "restart-node":
            s.add_argument("node", help="worker node name (w1, w2, ...)")
        if name == "up":
            s.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
            s.add_argument("--cpus-per-node", type=float, default=1.0, help="logical CPUs per node (default 1)")
            s.add_argument("--gcs-port", type=int, default=6379)
            s.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API")
            s.add_argument("--mlflow-port", type=int, default=5000)
            s.add_argument("--subnet", default=DEFAULT_SUBNET, help="private /24 of the node namespaces")
            g = s.add_mutually_exclusive_group()
            g.add_argument(
                "--netns",
                dest="netns",
                action="store_true",
                default=None,
                help="nodes in network namespaces (default when root)",
            )
            g.add_argument("--no-netns", dest="netns", action="store_false", help="nodes as host processes")
            s.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for startup")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.action == "up":
        state = up(
            args.state_dir,
            workers=args.workers,
            cpus_per_node=args.cpus_per_node,
            gcs_port=args.gcs_port,
            dashboard_port=args.dashboard_port,
            mlflow_port=args.mlflow_port,
            subnet=args.subnet,
            netns=args.netns,
            timeout_s=args.timeout,
        )
        print(describe(state))
        return 0
    if args.action == "restart-node":
        state = restart_node(args.state_dir, args.node)
        print(f"node {args.node} is back: " + ", ".join(n["node_ip"] for n in alive_nodes(state)))
        return 0
    if args.action == "down":
        state = load_state(args.state_dir)
        if state is None:
            print(f"no cluster state in {args.state_dir.absolute()}; nothing to stop")
            return 0
        n = down(args.state_dir)
        print(f"stopped cluster {state.id}: {n} process(es), {len(state.namespaces)} namespace(s)")
        return 0
    state = load_state(args.state_dir)
    if state is None:
        print(f"no cluster in {args.state_dir.absolute()}")
        return 1
    print(describe(state))
    try:
        nodes = alive_nodes(state)
        print(f"\nRay reports {len(nodes)} alive node(s): " + ", ".join(n["node_ip"] for n in nodes))
    except (OSError, ValueError) as e:
        print(f"\nthe Ray dashboard does not answer: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
