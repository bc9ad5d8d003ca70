"""What `h2ot cluster up` made, on disk: `<state-dir>/state.json` (written before each thing is made, so a crash
half-way leaves a complete list for `down`), the cluster's token, and the text `status` prints.

The state folder is private (0700) and the token file is created 0600, never readable by others for a moment.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster import ClusterError
from cluster.procs import is_alive

MARKER = "H2OT_CLUSTER_ID"  # environment marker of every process a cluster starts: `down` finds them by it
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
ENV_FILE = "env.sh"
DEFAULT_STATE_DIR = Path.home() / ".h2ot" / "cluster"
STATE_DIR_MODE = 0o700
TOKEN_MODE = 0o600


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
    head_cpus: float | None = None  # logical CPUs of the head node; None: cpus_per_node, like every worker

    @property
    def head_num_cpus(self) -> float:
        return self.cpus_per_node if self.head_cpus is None else self.head_cpus

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
        """HTTP headers that carry the cluster's token: for this package's own requests and for in-process Ray
        clients (`JobSubmissionClient`, `StateApiClient`). Ray reads its auth mode once per process, so setting
        `client_env()` after an earlier `ray.init()` (say, with auth disabled) is not enough."""
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"} if self.token_path else {}


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def make_state_dir(state_dir: Path) -> None:
    """The state folder (and its logs/), private to its owner whatever the umask; an existing one is tightened."""
    state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        state_dir.chmod(STATE_DIR_MODE)
    except PermissionError:
        raise ClusterError(f"--state-dir {state_dir}: not yours to make private (mode 0700); pick a folder of "
                           "your own, e.g. a new one under your home") from None
    (state_dir / "logs").mkdir(mode=STATE_DIR_MODE, exist_ok=True)


def write_token(state_dir: Path) -> Path:
    """A fresh random token in `<state-dir>/auth_token`, created with mode 0600 (os.open applies the mode at
    creation; the umask can only take bits away), never another user's file nor a symlink."""
    path = Path(state_dir) / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TOKEN_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


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
        raise ClusterError(f"{path}: unreadable cluster state ({e}); remove it after checking nothing runs") from None


def write_env_file(state: ClusterState) -> Path:
    """`source <state-dir>/env.sh` sets what `ray job submit` and MLflow clients need."""
    env = {**state.client_env(), "RAY_ADDRESS": state.dashboard_url, "MLFLOW_TRACKING_URI": state.mlflow_url}
    path = Path(state.state_dir) / ENV_FILE
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return path


def submit_hint(state: ClusterState, module: str = "jobs.train", args: str = "--config configs/tiny.yaml") -> str:
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": state.mlflow_url}})
    return (
        f"ray job submit --address {state.dashboard_url} --working-dir . "
        f"--runtime-env-json '{runtime_env}' -- python -m {module} {args}"
    )


def describe(state: ClusterState) -> str:
    """Nodes, addresses, and the commands to use and stop the cluster (what `up` and `status` print)."""
    lines = [f"h2ot cluster {state.id} ({state.mode} mode, state in {state.state_dir})"]
    for node in state.nodes:
        where = f"netns {node.netns}" if node.netns else "host"
        alive = "running" if is_alive(node.pid, node.start_ticks) else "STOPPED"
        cpus = state.head_num_cpus if node is state.head else state.cpus_per_node
        lines.append(f"  {node.name:<5} {node.ip or '?':<15} {where:<24} {cpus:g} CPU  pid {node.pid}  {alive}")
    alive = "running" if is_alive(state.mlflow_pid, state.mlflow_start_ticks) else "STOPPED"
    lines += [
        f"  mlflow {state.mlflow_host}:{state.mlflow_port}  pid {state.mlflow_pid}  {alive}",
        "",
        f"Ray GCS:          {state.gcs_address}",
        f"Ray dashboard:    {state.dashboard_url}   (Jobs API)",
        f"MLflow UI:        {state.mlflow_url}",
        "",
        "Client environment (token auth):",
        f"  source {Path(state.state_dir) / ENV_FILE}",
        "Submit a job:",
        f"  {submit_hint(state)}",
        "Or run a driver on the head (not from the host's namespace: see `h2ot cluster exec --help`):",
        f"  h2ot cluster exec --state-dir {state.state_dir} -- python -m jobs.preprocess --source synthetic --out DIR",
        "Open the MLflow UI:",
        f"  xdg-open {state.mlflow_url}   # or: chromium --headless --dump-dom {state.mlflow_url}",
        f"Stop:  h2ot cluster down --state-dir {state.state_dir}",
    ]
    return "\n".join(lines)
