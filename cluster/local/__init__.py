"""`h2ot cluster up|down|status`: a multi-node Ray cluster and an MLflow server on one machine.

As root, each Ray node (a head and N workers, separate `ray start` processes) lives in its own network
namespace on a private bridge (cluster.local.network); without root (or with `--no-netns`) the nodes are plain
host processes and MLflow binds 127.0.0.1. The state folder records everything before it is made
(cluster.local.state), so `down` stops exactly what `up` started (cluster.local.nodes), even after a crash.
The command line is `jobs/cluster.py`; `failure_drill.py` here kills a node during training and measures.
"""

from cluster.local.network import DEFAULT_SUBNET, can_use_netns, check_port_free, free_subnet, subnet_in_use
from cluster.local.nodes import (
    START_TIMEOUT_S,
    alive_nodes,
    down,
    driver_command,
    driver_env,
    marked_pids,
    restart_node,
    stop_processes,
    store_stats,
    up,
)
from cluster.local.state import (
    DEFAULT_STATE_DIR,
    MARKER,
    ClusterState,
    NodeState,
    describe,
    load_state,
    save_state,
    write_env_file,
)

__all__ = ["DEFAULT_STATE_DIR", "DEFAULT_SUBNET", "MARKER", "START_TIMEOUT_S", "ClusterState", "NodeState",
           "alive_nodes", "can_use_netns", "check_port_free", "describe", "down", "driver_command", "driver_env",
           "free_subnet", "load_state", "marked_pids", "restart_node", "save_state", "stop_processes",
           "store_stats", "subnet_in_use", "up", "write_env_file"]
