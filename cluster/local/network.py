"""The local cluster's network: as root, one network namespace per Ray node, joined to the host by veth pairs on
a private bridge (the nodes are then separate hosts with their own addresses); and the port checks of host mode.

    host (root namespace)   bridge h2ot<id>  10.213.7.1   <- MLflow server binds here
    namespace h2ot-<id>-head              10.213.7.2   <- Ray head: GCS :6379, dashboard + Jobs API :8265
    namespace h2ot-<id>-w1                10.213.7.3   <- Ray worker node
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from cluster import ClusterError
from cluster.local.state import ClusterState, NodeState, save_state

DEFAULT_SUBNET = "10.213.7.0/24"
NS_IFNAME = "eth0"  # the node's interface inside its namespace


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ClusterError(f"`{shlex.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")


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


def free_subnet(prefix: str = "10.213", thirds: range = range(7, 250)) -> str:
    """The first `<prefix>.<third>.0/24` no route of this host overlaps (a bridge of another cluster included)."""
    for third in thirds:
        subnet = f"{prefix}.{third}.0/24"
        if subnet_in_use(subnet) is None:
            return subnet
    raise ClusterError(f"no free {prefix}.x.0/24 for the cluster's bridge; pass --subnet")


def setup_network(state: ClusterState, names: list[str]) -> None:
    """Bridge on the host + one namespace per node with a veth into the bridge. Records before creating."""
    net = ipaddress.ip_network(state.subnet)
    hosts = list(net.hosts())
    if len(hosts) < len(names) + 1:
        raise ClusterError(f"--subnet {state.subnet} is too small for {len(names)} nodes")
    dev = subnet_in_use(state.subnet)
    if dev is not None:
        raise ClusterError(f"--subnet {state.subnet} overlaps a route of device {dev}; pick another private /24")
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


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    """Raise a ClusterError naming the port, the service and the option to change it, if `host:port` is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "taken"
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ClusterError(
                f"port {port} on {host} is taken ({what}: {e.strerror}); choose another with {option} "
                f"or stop what listens there (`ss -ltnp 'sport = :{port}'`)"
            ) from None
