"""`h2ot bench-preprocess-scaling`: the Ray preprocessing job on 1, 2, ... worker nodes of the local cluster.

    h2ot bench-preprocess-scaling --workers 1,2 --copies 10 --json    # as root: each node in its own namespace

For each setting: `h2ot cluster up` with a head that holds no task CPUs (--head-cpus 0) and N worker nodes of
1 CPU (not timed); the job, a fresh process run as a driver on the head (`h2ot cluster exec`); `h2ot cluster
down`. The job is `h2ot bench-preprocess --address GCS --copies N --ray-only --json`, which times itself as a
user sees a job on a running cluster (its own interpreter start included); where this checkout's
bench-preprocess has no --ray-only, `h2ot preprocess` on the one --input runs instead, timed here.

Prints windows/s per setting and each setting's ratio to the first; the shards must be byte-identical in every
setting (content hash) or the command fails. Per setting it also shows where the job's tasks ran and waited,
per node (Ray's task events: tasks on the head, time in each task state, a node idle while tasks waited for
one), the bytes each node's object store created (objects pulled from another node included), peak PSS summed
over the cluster's processes, the CPU seconds of each kind of process (task workers, driver, Ray's daemons), and
the load averages: on a shared machine the figures are not a benchmark (Ray runs its task workers at niceness
15, so other work on the machine takes the CPU from them first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs._common import UserError, friendly_errors, print_figures

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_H36M = REPO / ".." / "shared" / "data" / "h36m" / "data_3d_h36m.npz"
JOB_KEYS = ("windows", "seconds_ray", "windows_per_s_ray", "content_hash")  # what every job runner returns
JOB_TIMEOUT_S = 3600.0
PSS_INTERVAL_S = 1.0  # reading every process's smaps_rollup costs CPU the job would miss: once a second
SAMPLER_NICENESS = 19
TASK_EVENTS_FLUSH_S = 2.0  # workers report task events to the GCS every second; wait for the last ones
GRID_MS = 10  # resolution of "a node idle while tasks waited for one"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

JobRunner = Callable[[Any], dict[str, Any]]  # a running cluster's ClusterState -> the job's figures (JOB_KEYS)


class ScalingError(Exception):
    """The benchmark cannot give a valid answer (a job failed, the shards differ between settings)."""


# ------------------------------------------------------------------------------------------------ the job
def run_driver(state, argv: list[str], timeout_s: float = JOB_TIMEOUT_S) -> str:
    """`argv` as a driver on the cluster's head, from this checkout (PYTHONPATH, working directory): its stdout.

    Ray adds the driver's working directory to every worker's import path, so worker nodes import the same
    `pipelines` as the driver; paths on the command line must be absolute (the nodes share this filesystem).
    """
    from cluster import local

    env = local.driver_env(state)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(local.driver_command(state, argv), env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ScalingError(f"the job did not finish within {timeout_s:.0f} s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ScalingError(f"the job failed (exit {proc.returncode}): {' '.join(argv)}\n  {tail}")
    return proc.stdout


def parse_job_figures(stdout: str) -> dict[str, Any]:
    """The last line of `stdout` that is a JSON object, which must hold JOB_KEYS."""
    for line in reversed(stdout.strip().splitlines()):
        if not line.lstrip().startswith("{"):
            continue
        try:
            figures = json.loads(line)
        except ValueError:
            continue
        if isinstance(figures, dict):
            missing = [k for k in JOB_KEYS if k not in figures]
            if missing:
                raise ScalingError(f"the job's JSON lacks {missing}; it has {sorted(figures)}")
            return figures
    tail = " | ".join(stdout.strip().splitlines()[-3:])
    raise ScalingError(f"the job printed no JSON object; its output ends: {tail or '(nothing)'}")


def bench_preprocess_job(copies: int, workdir: Path, input: str | None = None) -> JobRunner:
    """The job as `h2ot bench-preprocess --address GCS --copies N --ray-only --json --workdir DIR` times it.

    Every setting gets the same --workdir, so the input copies can be written once and reused."""

    def run(state) -> dict[str, Any]:
        argv = [sys.executable, "-m", "jobs.cli", "bench-preprocess", "--address", state.gcs_address,
                "--copies", str(copies), "--ray-only", "--json", "--workdir", str(workdir)]
        if input:
            argv += ["--input", input]
        return parse_job_figures(run_driver(state, argv))

    return run


def preprocess_job(input: str, workdir: Path) -> JobRunner:
    """Fallback where bench-preprocess has no --ray-only: `h2ot preprocess --source h36m` on `input`, timed here
    from the command's start to its exit (manifest written, Ray disconnected)."""
    from pipelines.shards import load_manifest

    def run(state) -> dict[str, Any]:
        out = Path(tempfile.mkdtemp(prefix="scaling-", dir=workdir)) / "shards"
        argv = [sys.executable, "-m", "jobs.cli", "preprocess", "--source", "h36m", "--input", input,
                "--out", str(out), "--no-progress"]
        try:
            t0 = time.perf_counter()
            run_driver(state, argv)
            seconds = time.perf_counter() - t0
            m = load_manifest(out)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        windows = m["counts"]["train"]["windows"] + m["counts"]["test"]["windows"]
        return {"windows": windows, "seconds_ray": round(seconds, 3), "windows_per_s_ray": round(windows / seconds, 1),
                "content_hash": m["content_hash"], "timings_ray": m["timings"]}

    return run


WARM_UP = """
import ray
ray.init(log_to_driver=False)
ping = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(lambda: None)
ray.get([ping.remote() for _ in range(int(ray.cluster_resources().get("CPU", 1)))])
ray.shutdown()
"""


def warm_up(state) -> float:
    """One small job before the timed one (seconds it took): a fresh cluster's first driver connected in
    1.1-1.5 s on two worker nodes but 2.7-6.5 s on one (measured under load), which a cluster that is already
    running (the case measured here) has that behind it; also one task per CPU, so every node has started a worker."""
    t0 = time.perf_counter()
    run_driver(state, [sys.executable, "-c", WARM_UP], timeout_s=600)
    return round(time.perf_counter() - t0, 3)


def has_ray_only_bench() -> bool:
    """Whether this checkout's `h2ot bench-preprocess` takes --address, --copies and --ray-only."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "bench-preprocess", "--help"], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return all(flag in proc.stdout for flag in ("--address", "--copies", "--ray-only"))


# ------------------------------------------------------------------------------------------------ observing
def pss_mb(pids: list[int]) -> float:
    """Proportional set size of `pids` together, MB (shared pages split between the processes sharing them);
    processes gone meanwhile, or not ours to read, count 0."""
    from pipelines.bench import process_pss_mb

    return sum(mb for mb in map(process_pss_mb, pids) if mb is not None)


def process_role(pid: int) -> str | None:
    """role_of the command line of `pid`; None once it is gone."""
    try:
        return role_of(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))
    except OSError:
        return None


def role_of(argv: list[str]) -> str:
    """What a process of the cluster is: the bench-preprocess timer or the job's driver, a Ray daemon (raylet,
    gcs, dashboard and its agents, monitors, `ray start --block` itself), a Ray worker running tasks, one of
    Ray Data's helper actors, MLflow."""
    if argv and argv[0].startswith("ray::"):  # a Ray worker names itself after what it runs
        title = argv[0][len("ray::"):].strip()
        return WORKER_TITLES.get(title, "ray data helper actors" if title.startswith("_") else "ray task workers")
    text = " ".join(argv)
    return next((role for needle, role in ROLES if needle in text), "other")


WORKER_TITLES = {"DashboardAgent": "dashboard agent", "RuntimeEnvAgent": "runtime_env agent"}
ROLES = [  # (text in the command line, role); the first match counts
    ("raylet/raylet", "raylet"), ("gcs_server", "gcs"), ("dashboard/dashboard.py", "dashboard"),
    ("log_monitor.py", "log monitor"), ("autoscaler/_private/monitor.py", "monitor"),
    ("ray.util.client.server", "ray client server"), ("default_worker.py", "ray task workers"),
    ("bench-preprocess", "bench-preprocess (timer, PSS sampler)"), ("jobs.", "job driver"),
    ("mlflow", "mlflow"), ("ray start", "ray start --block"),
]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds `pid` has used so far (None once it is gone)."""
    try:  # the fields after `(comm)`, which may hold spaces: utime and stime are the 12th and 13th
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


class ClusterSampler:
    """While the `with` block runs, a thread samples the cluster's processes (all carrying its marker: the
    driver, GCS, raylets, workers, MLflow) every `interval_s`: peak_mb, the peak of their summed PSS, and
    cpu_s_by_role, the CPU seconds each kind of process used meanwhile (a process that exits between two
    samples loses at most one interval of its CPU time)."""

    def __init__(self, cluster_id: str, interval_s: float = PSS_INTERVAL_S) -> None:
        self.cluster_id, self.interval_s, self.peak_mb = cluster_id, interval_s, 0.0
        self._start: dict[int, float] = {}  # cpu seconds at the first sample of each process alive then
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._first = True
        self._is_marked: dict[int, bool] = {}
        self.sampler_cpu_s = 0.0  # CPU seconds the sampling took (this process is not the cluster's: not counted)

    def _marked_pids(self) -> list[int]:
        """marked_pids, reading the environment of a process only until it is known (that was most of the cost);
        a process younger than a second may not have exec'd with its own environment yet: asked again."""
        from cluster.local import MARKER
        from cluster.procs import has_marker, start_ticks

        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        out = []
        for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()):
            marked = self._is_marked.get(pid)
            if marked is None:
                marked = has_marker(pid, MARKER, self.cluster_id)
                ticks = start_ticks(pid)
                if marked or (ticks is not None and uptime_s - ticks / CLOCK_TICKS > 1.0):
                    self._is_marked[pid] = marked
            if marked:
                out.append(pid)
        return out

    def _sample(self) -> None:
        try:  # reading PSS walks each process's page tables (~0.1 CPU s a sample here): behind Ray's workers (15)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAMPLER_NICENESS)
        except OSError:
            pass
        c0 = time.thread_time()
        while True:
            pids = self._marked_pids()
            self.peak_mb = max(self.peak_mb, pss_mb(pids))
            for pid in pids:
                cpu, role = cpu_seconds(pid), self._last.get(pid, (None,))[0] or process_role(pid)
                if cpu is None or role is None:
                    continue
                if self._first:
                    self._start[pid] = cpu
                self._last[pid] = (role, cpu)
            self._first = False
            self.sampler_cpu_s = time.thread_time() - c0
            if self._stop.wait(self.interval_s):
                return

    @property
    def cpu_s_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (role, cpu) in list(self._last.items()):  # the sampling thread may be adding to it
            out[role] = out.get(role, 0.0) + cpu - self._start.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def __enter__(self) -> ClusterSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class TaskRecord:
    """One task as Ray's task events tell it: the node it ran on and (state, time ms) in order."""

    node: str
    events: list[tuple[str, float]] = field(default_factory=list)

    def intervals(self, state: str) -> list[tuple[float, float]]:
        """[start, end) ms of each stay in `state` (until the next event)."""
        ev = sorted(self.events, key=lambda e: e[1])
        return [(t, ev[i + 1][1]) for i, (s, t) in enumerate(ev[:-1]) if s == state]


def summarize_tasks(tasks: list[TaskRecord], node_cpus: dict[str, float]) -> dict[str, Any]:
    """Per node (name -> logical CPUs): tasks, seconds in each task state (PENDING_NODE_ASSIGNMENT: waiting for a
    CPU; PENDING_ARGS_FETCH: its input moving from another node; SUBMITTED_TO_WORKER: a worker starting;
    RUNNING), the first and the median task's running seconds (the first pays the worker's imports and any
    object it fetches once), and for nodes with CPUs idle_while_queued_s (the node ran nothing while some task
    waited for a node) and idle_at_end_s (from the node's last task to the cluster's: the tail's imbalance).
    span_s: the first task event to the last."""
    import numpy as np

    per_node: dict[str, dict[str, Any]] = {n: {"tasks": 0, "state_s": {}} for n in node_cpus}
    times = [t for task in tasks for _, t in task.events]
    if not times:
        return {"span_s": 0.0, "nodes": per_node}
    grid = np.arange(min(times), max(times), GRID_MS, dtype=np.float64)
    queued = np.zeros(len(grid), bool)
    busy: dict[str, np.ndarray] = {}
    running: dict[str, list[tuple[float, float]]] = {}
    for task in tasks:
        node = per_node.setdefault(task.node, {"tasks": 0, "state_s": {}})
        node["tasks"] += 1
        ev = sorted(task.events, key=lambda e: e[1])
        for (state, t), (_, t_next) in zip(ev, ev[1:]):
            node["state_s"][state] = node["state_s"].get(state, 0.0) + (t_next - t) / 1000
        node_busy = busy.setdefault(task.node, np.zeros(len(grid), bool))
        for lo, hi in task.intervals("RUNNING"):
            node_busy[np.searchsorted(grid, lo):np.searchsorted(grid, hi)] = True
            running.setdefault(task.node, []).append((lo, hi))
        for lo, hi in task.intervals("PENDING_NODE_ASSIGNMENT"):
            queued[np.searchsorted(grid, lo):np.searchsorted(grid, hi)] = True
    runs_all = [r for rs in running.values() for r in rs]
    for name, node in per_node.items():
        node["state_s"] = {k: round(v, 3) for k, v in sorted(node["state_s"].items())}
        runs = sorted(running.get(name, []))
        node["first_task_s"] = round((runs[0][1] - runs[0][0]) / 1000, 3) if runs else None
        node["median_task_s"] = round(float(np.median([hi - lo for lo, hi in runs])) / 1000, 3) if runs else None
        node_busy = busy.get(name, np.zeros(len(grid), bool))
        node["busy_fraction"] = round(float(node_busy.mean()), 3) if len(grid) else 0.0
        if node_cpus.get(name, 1.0) > 0:
            node["idle_while_queued_s"] = round(float((queued & ~node_busy).sum()) * GRID_MS / 1000, 3)
            last_end = max((hi for _, hi in runs), default=min(times))
            node["idle_at_end_s"] = round((max(hi for _, hi in runs_all) - last_end) / 1000, 3) if runs_all else None
        else:
            node["idle_while_queued_s"] = node["idle_at_end_s"] = None
    return {"span_s": round((max(times) - min(times)) / 1000, 3), "nodes": per_node}


def cluster_tasks(state, since_ms: float = 0.0) -> list[TaskRecord]:
    """Every normal (non-actor) task the cluster ran, created at or after `since_ms` (epoch milliseconds, the
    clock of Ray's task events), from the head's state API."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    api = StateApiClient(address=state.dashboard_url, headers=state.auth_headers())
    names = {n.ip: n.name for n in state.nodes}
    node_ip = {n.node_id: n.node_ip for n in api.list(StateResource.NODES, options=ListApiOptions(),
                                                      raise_on_missing_output=False)}
    options = ListApiOptions(detail=True, limit=10_000, filters=[("type", "=", "NORMAL_TASK")])
    out = []
    for t in api.list(StateResource.TASKS, options=options, raise_on_missing_output=False):
        ip = node_ip.get(t.node_id) if t.node_id else None
        events = [(e["state"], float(e["created_ms"])) for e in (t.events or [])]
        if events and min(ms for _, ms in events) >= since_ms:
            out.append(TaskRecord(node=names.get(ip, ip or "unassigned"), events=events))
    return out


def measure_setting(state, job: JobRunner) -> dict[str, Any]:
    """Run `job` once on the running cluster `state`; its figures plus what the cluster saw."""
    from cluster import local

    warm_up_s = warm_up(state)
    store_before = local.store_stats(state)
    cpus = {n["node_ip"]: n["cpus"] for n in local.alive_nodes(state)}
    idle_mb = pss_mb(local.marked_pids(state.id))
    load_before = [round(x, 2) for x in os.getloadavg()]
    with ClusterSampler(state.id) as sampler:
        job_start_ms = time.time() * 1000  # the warm-up's tasks came before
        t0 = time.perf_counter()
        figures = job(state)
        seconds_command = time.perf_counter() - t0
    load_after = [round(x, 2) for x in os.getloadavg()]
    store_after = local.store_stats(state)
    time.sleep(TASK_EVENTS_FLUSH_S)  # (not timed) the workers' last task events reach the GCS
    names = {n.ip: n.name for n in state.nodes}
    try:
        tasks = summarize_tasks(cluster_tasks(state, job_start_ms), {names.get(ip, ip): c for ip, c in cpus.items()})
    except Exception as e:  # noqa: BLE001 - an observation only: the job's own figures still count
        log.warning("could not read the task events from the state API: %s", e)
        tasks = {"span_s": None, "nodes": {}, "error": str(e)}
    for ip, after in store_after.items():
        node = tasks["nodes"].setdefault(names.get(ip, ip), {"tasks": 0, "state_s": {}})
        node["cpus"] = cpus.get(ip)
        for key, value in after.items():  # created_mb (pulled from other nodes included), spilled_mb, restored_mb
            node[key.replace("_bytes", "_mb")] = round((value - store_before.get(ip, {}).get(key, 0)) / 1e6, 1)
    return {
        **figures,
        "seconds_command": round(seconds_command, 3),
        "warm_up_s": warm_up_s,
        "tasks_on_head": tasks["nodes"].get("head", {}).get("tasks", 0),
        "task_span_s": tasks["span_s"],
        "nodes": tasks["nodes"],
        "idle_pss_mb_cluster": round(idle_mb, 1),
        "peak_pss_mb_cluster": round(sampler.peak_mb, 1),
        "cpu_s_by_role": sampler.cpu_s_by_role,
        "sampler_cpu_s": round(sampler.sampler_cpu_s, 2),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


# ------------------------------------------------------------------------------------------------ settings
def run_scaling(workers: list[int], start: Callable[[int], Any], stop: Callable[[Any], None],
                measure: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """For each worker count: start a cluster (not timed), measure the job on it, stop it (always); compare.

    Raises ScalingError when the settings wrote different shards."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    settings = []
    for n in workers:
        log.info("setting: %d worker node(s)", n)
        state = start(n)
        try:
            settings.append({"workers": n, **measure(state)})
        finally:
            stop(state)
    hashes = {s["workers"]: s["content_hash"] for s in settings}
    if len(set(hashes.values())) != 1:
        raise ScalingError("the settings wrote different shards (content hash per worker count: "
                           + ", ".join(f"{n}: {h}" for n, h in hashes.items()) + "); the figures are not comparable")
    base = settings[0]
    out: dict[str, Any] = {
        "windows": base["windows"],
        "content_hash": base["content_hash"],
        "same_shards": True,
        "windows_per_s": {str(s["workers"]): s["windows_per_s_ray"] for s in settings},
    }
    for s in settings[1:]:
        out[f"ratio_{s['workers']}_vs_{base['workers']}"] = round(s["windows_per_s_ray"] / base["windows_per_s_ray"], 3)
    out["settings"] = settings
    out["load_average_before"] = load_before
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def cluster_starter(args: argparse.Namespace, state_dir: Path) -> tuple[Callable[[int], Any], Callable[[Any], None]]:
    """`start(n)`: head with no task CPUs + n worker nodes of --cpus-per-worker; `stop(state)`: down."""
    from cluster import local

    subnet = args.subnet or (local.free_subnet() if args.netns is not False and local.can_use_netns() else None)

    def start(n: int):
        return local.up(state_dir, workers=n, cpus_per_node=args.cpus_per_worker, head_cpus=0,
                        gcs_port=args.gcs_port, dashboard_port=args.dashboard_port, mlflow_port=args.mlflow_port,
                        subnet=subnet or local.DEFAULT_SUBNET, netns=args.netns, timeout_s=args.start_timeout)

    def stop(state) -> None:
        local.down(Path(state.state_dir))

    return start, stop


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="h2ot bench-preprocess-scaling", description=__doc__.split("\n")[0].split(": ")[1])
    p.add_argument("--workers", default="1,2", help="worker node counts, one cluster each (default 1,2)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=1.0)
    p.add_argument("--copies", type=int, default=10, help="distinct copies of the input the job processes")
    p.add_argument("--input", default=None, help="Human3.6M 3D npz (default: the shared file)")
    p.add_argument("--job", choices=["auto", "bench-preprocess", "preprocess"], default="auto",
                   help="auto: bench-preprocess --ray-only where this checkout has it, else preprocess (--copies 1)")
    p.add_argument("--workdir", type=Path, default=None, help="input copies, shards, cluster state (default: temp)")
    p.add_argument("--subnet", default=None, help="the clusters' /24 (default: the first free 10.213.x.0/24)")
    p.add_argument("--gcs-port", dest="gcs_port", type=int, default=6379)
    p.add_argument("--dashboard-port", dest="dashboard_port", type=int, default=8265)
    p.add_argument("--mlflow-port", dest="mlflow_port", type=int, default=5000)
    p.add_argument("--no-netns", dest="netns", action="store_false", default=None,
                   help="nodes as host processes (default: network namespaces when root)")
    p.add_argument("--start-timeout", dest="start_timeout", type=float, default=180.0)
    p.add_argument("--json", action="store_true", help="print only the JSON figures")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def worker_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--workers {text!r}: give worker node counts >= 1, e.g. 1,2")
    return counts


def choose_job(args: argparse.Namespace, input: str, workdir: Path) -> tuple[str, JobRunner]:
    kind = args.job
    if kind == "auto":
        kind = "bench-preprocess" if has_ray_only_bench() else "preprocess"
    if kind == "bench-preprocess":
        return kind, bench_preprocess_job(args.copies, workdir, input)
    if args.copies != 1:
        raise UserError(f"--copies {args.copies} needs `h2ot bench-preprocess --ray-only --copies`, which this "
                        "checkout lacks; the fallback job (`h2ot preprocess`) reads the one --input: pass --copies 1")
    return kind, preprocess_job(input, workdir)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    counts = worker_counts(args.workers)
    input = str(Path(args.input or DEFAULT_H36M).resolve())
    if not Path(input).is_file():
        raise UserError(f"--input {input}: no such file (the Human3.6M npz in VideoPose3D layout)")
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="h2ot-scaling-") if own_workdir else args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        kind, job = choose_job(args, input, workdir)
        start, stop = cluster_starter(args, workdir / "cluster")
        figures = run_scaling(counts, start, stop, lambda state: measure_setting(state, job))
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = {"job": kind, "copies": args.copies if kind == "bench-preprocess" else 1, "input": input,
               "cpus_per_worker": args.cpus_per_worker, "head_cpus": 0, **figures}
    print_figures(figures, args.json, width=22)
    return 0


if __name__ == "__main__":
    sys.exit(main())
