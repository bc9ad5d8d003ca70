"""`h2ot cluster up|down|status|restart-node`: a multi-node Ray cluster and an MLflow server on one machine.

The command line only; the cluster itself is the `cluster.local` package (network namespaces, state file,
starting and stopping exactly what was started). Usage, security and the failure drill: docs/CLUSTER.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from cluster import local
from jobs._common import UserError, friendly_errors, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="h2ot cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    for name, text in [
        ("up", "start head + workers + MLflow"),
        ("down", "stop everything `up` started"),
        ("status", "show nodes, addresses and commands"),
        ("restart-node", "start a dead worker node again (e.g. after a failure drill)"),
        ("exec", "run a command as a Ray driver on the head node (RAY_ADDRESS, token and MLflow set)"),
    ]:
        s = sub.add_parser(name, help=text)
        s.add_argument("--state-dir", type=Path, default=local.DEFAULT_STATE_DIR,
                       help=f"where the state, token, logs and MLflow store live (default {local.DEFAULT_STATE_DIR})")
        s.add_argument("-v", "--verbose", action="store_true")
        if name == "restart-node":
            s.add_argument("node", help="worker node name (w1, w2, ...)")
        if name == "exec":
            s.add_argument("command", nargs=argparse.REMAINDER,
                           help="the command after `--`, e.g. -- python -m jobs.preprocess --source synthetic --out DIR"
                                " (a driver in the host's namespace connects but hangs on the first object a worker"
                                " node fetches from it)")
        if name == "up":
            s.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
            s.add_argument("--cpus-per-node", type=float, default=1.0,
                           help="logical CPUs of each worker node, and of the head unless --head-cpus (default 1)")
            s.add_argument("--head-cpus", type=float, default=None,
                           help="logical CPUs of the head node (default: --cpus-per-node); 0: no tasks on the head, "
                                "which keeps the GCS, dashboard and job drivers only")
            s.add_argument("--gcs-port", type=int, default=6379)
            s.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API")
            s.add_argument("--mlflow-port", type=int, default=5000)
            s.add_argument("--subnet", default=local.DEFAULT_SUBNET, help="private /24 of the node namespaces")
            g = s.add_mutually_exclusive_group()
            g.add_argument("--netns", dest="netns", action="store_true", default=None,
                           help="nodes in network namespaces (default when root)")
            g.add_argument("--no-netns", dest="netns", action="store_false", help="nodes as host processes")
            s.add_argument("--timeout", type=float, default=local.START_TIMEOUT_S, help="seconds to wait for startup")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.action == "up":
        state = local.up(args.state_dir, workers=args.workers, cpus_per_node=args.cpus_per_node,
                         gcs_port=args.gcs_port, dashboard_port=args.dashboard_port, mlflow_port=args.mlflow_port,
                         subnet=args.subnet, netns=args.netns, timeout_s=args.timeout, head_cpus=args.head_cpus)
        print(local.describe(state))
        return 0
    if args.action == "exec":
        return _exec(args.state_dir, args.command)
    if args.action == "restart-node":
        state = local.restart_node(args.state_dir, args.node)
        print(f"node {args.node} is back: " + ", ".join(n["node_ip"] for n in local.alive_nodes(state)))
        return 0
    state = local.load_state(args.state_dir)
    if state is None:
        print(f"no cluster{' state' if args.action == 'down' else ''} in {args.state_dir.absolute()}"
              + ("; nothing to stop" if args.action == "down" else ""))
        return 0 if args.action == "down" else 1
    if args.action == "down":
        n = local.down(args.state_dir)
        print(f"stopped cluster {state.id}: {n} process(es), {len(state.namespaces)} namespace(s)")
        return 0
    print(local.describe(state))
    try:
        nodes = local.alive_nodes(state)
        print(f"\nRay reports {len(nodes)} alive node(s): "
              + ", ".join(f"{n['node_ip']} ({'head, ' if n['is_head'] else ''}{n['cpus']:g} CPU)" for n in nodes))
    except (OSError, ValueError) as e:
        print(f"\nthe Ray dashboard does not answer: {e}")
        return 1
    return 0


def _exec(state_dir: Path, command: list[str]) -> int:
    """Run `command` on the head node as a driver of the cluster; its exit status is ours."""
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        raise UserError("nothing to run: h2ot cluster exec [--state-dir DIR] -- COMMAND ...")
    state = local.load_state(state_dir)
    if state is None or not state.ready:
        raise UserError(f"no running cluster in {state_dir.absolute()}; start one with `h2ot cluster up`")
    return subprocess.call(local.driver_command(state, command), env=local.driver_env(state))


if __name__ == "__main__":
    sys.exit(main())
