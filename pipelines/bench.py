"""Benchmark: the Ray Data pipeline vs a plain single-process loop on the same input (`run_bench`; the command
line is `h2ot bench-preprocess`, jobs/bench_preprocess.py).

Fair by construction: both paths are the user's own command, `python -m jobs.preprocess` (the `h2ot preprocess`
job), run as a fresh process with the same config, so they call the same per-sequence functions
(`process_group` -> `prepare_sequence` -> windows -> `write_shard`) and the same Parquet writer settings. Each
timing is the whole job as a user sees it: interpreter start, imports, listing and hashing the input, the work,
and the manifest written. For Ray that is either a local Ray the job starts and stops itself, or (`address`) a
cluster that is already running: then the job connects to it (RAY_ADDRESS) and the cluster's start is not timed.
Both builds must have the same content hash (byte-identical shard files).

Larger inputs: `copies=N` builds on N distinct files of the input's size, the input itself and N - 1 copies of
its 3D motion under another rigid motion each (a turn about the vertical axis through the capture area's centre,
plus a small shift), written once into a cache folder and reused (`write_copies`). Distinct bytes, so no parse
cache can reuse a file, and the same number of windows per file.

Memory: the peak of the PSS summed over the job's processes, sampled every 0.2 s: the job, its children (a local
Ray's), and, on a running cluster, the Ray workers started for it (processes below the cluster's raylets that
began after the job; run the benchmark on a cluster that runs nothing else).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.records import PipelineError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PSS_INTERVAL_S = 0.2
CONNECT_TIMEOUT_S = 5.0
JOB_TIMEOUT_S = 3600.0  # a job still running after this is stopped and the benchmark fails
TREE_INTERVAL_S = 1.0  # how often the sampler looks for new processes of the job
COPY_VERSION = 1  # bump when write_copies writes other bytes
COPY_TURN_DEG = 37.0  # copy i is turned by i * this about the vertical axis ...
COPY_SHIFT_M = (0.02, -0.015)  # ... and shifted by i * this (x, y): copy i is the same whatever N is


# ------------------------------------------------------------------------------------------ larger inputs
def write_copies(path: str | Path, n: int, cache_dir: str | Path) -> list[str]:
    """[path] + n - 1 distinct copies of a VideoPose3D 3D file, written once under `cache_dir` and reused.

    The cache folder is named after the file (path, size, mtime) and COPY_VERSION; `copies.json` in it lists the
    copies written so far, so a later call with a larger n writes only the new ones.
    """
    from pipelines.safe_npz import load_npz, unwrap

    if n < 1:
        raise PipelineError(f"--copies must be >= 1, got {n}")
    src = Path(path).resolve()
    if not src.is_file():
        raise PipelineError(f"{path}: no such file")
    if n == 1:
        return [str(src)]
    st = src.stat()
    ident = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}\0{COPY_VERSION}".encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"{src.stem}-copies-{ident}"
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "copies.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    names = [f"data_3d_copy{i:02d}.npz" for i in range(1, n)]
    todo = [i for i, name in enumerate(names, 1)
            if not ((folder / name).is_file() and index.get(name) == (folder / name).stat().st_size)]
    if todo:
        log.warning("writing %d copies of %s into %s (once; later runs reuse them)", len(todo), src.name, folder)
        positions = unwrap(load_npz(src)["positions_3d"])
        with ThreadPoolExecutor(max_workers=2) as pool:  # zlib releases the GIL
            sizes = dict(pool.map(lambda i: _write_copy(positions, i, folder / names[i - 1]), todo))
        index.update(sizes)
        index_path.write_text(json.dumps(index, indent=1, sort_keys=True))
    return [str(src)] + [str(folder / name) for name in names]


def moved_copy(positions: dict[str, Any], index: int) -> dict[str, Any]:
    """The 3D motion of a VideoPose3D file under copy `index`'s rigid motion (same dtype and shapes)."""
    roots = np.concatenate([np.asarray(a)[:, 0] for actions in positions.values() for a in actions.values()])
    centre = (roots.min(0) + roots.max(0)) / 2
    turn = math.radians(COPY_TURN_DEG * index)
    rot = np.array([[math.cos(turn), -math.sin(turn), 0.0], [math.sin(turn), math.cos(turn), 0.0], [0, 0, 1.0]])
    shift = np.array([COPY_SHIFT_M[0] * index, COPY_SHIFT_M[1] * index, 0.0])
    pivot = np.array([centre[0], centre[1], 0.0])
    return {subject: {action: ((np.asarray(x, np.float64) - pivot) @ rot.T + pivot + shift).astype(np.asarray(x).dtype)
                      for action, x in actions.items()} for subject, actions in positions.items()}


def _write_copy(positions: dict[str, Any], index: int, path: Path) -> tuple[str, int]:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, positions_3d=np.array(moved_copy(positions, index), dtype=object))
    os.replace(tmp, path)
    return path.name, path.stat().st_size


# ------------------------------------------------------------------------------------------ memory
class PssSampler:
    """Peak PSS (MB) summed over a job's processes, sampled in a thread every PSS_INTERVAL_S.

    The job is `root` and its descendants, plus the descendants of `raylets` that started after `since` (the Ray
    workers of this job on a running cluster), listed again every TREE_INTERVAL_S. `sampler_cpu_s`: CPU seconds
    the sampling itself took (a few percent of one core).
    """

    def __init__(self, root: int, raylets: list[int], since: float) -> None:
        import psutil

        self._psutil = psutil
        self._root, self._raylets, self._since = root, raylets, since
        self.peak_mb = 0.0
        self.at_peak: dict[str, float] = {}  # "name:pid" -> MB of each process in the peak's sample
        self.sampler_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _processes(self) -> list[Any]:
        ps = self._psutil
        procs = []
        try:
            root = ps.Process(self._root)
            procs = [root, *root.children(recursive=True)]
        except ps.Error:
            pass
        for pid in self._raylets:
            try:
                procs += [p for p in ps.Process(pid).children(recursive=True) if p.create_time() >= self._since]
            except ps.Error:
                continue
        return procs

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # the jobs come first on busy cores
        c0 = time.thread_time()
        procs: list[Any] = []
        listed = -math.inf
        while not self._stop.is_set():
            if time.monotonic() - listed >= TREE_INTERVAL_S:  # walking /proc for the tree costs more than PSS
                procs, listed = self._processes(), time.monotonic()
            sample = {}
            for proc in procs:
                try:
                    mb = process_pss_mb(proc.pid)
                    if mb is not None:  # else gone, or a zombie: it holds no memory
                        sample[f"{proc.name()}:{proc.pid}"] = mb
                except self._psutil.Error:
                    continue
            if sum(sample.values()) > self.peak_mb:
                self.peak_mb = sum(sample.values())
                self.at_peak = {k: round(v, 1) for k, v in sorted(sample.items(), key=lambda kv: -kv[1])}
            self._stop.wait(PSS_INTERVAL_S)
        self.sampler_cpu_s = time.thread_time() - c0


def process_pss_mb(pid: int) -> float | None:
    """PSS of a process in MB from /proc/PID/smaps_rollup (the kernel's sum: a fraction of the CPU that parsing
    every mapping in /proc/PID/smaps, psutil's memory_full_info, takes on a 1 GB worker), psutil's where a kernel
    has no smaps_rollup; None once the process is gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) / 1024  # kB
        return None
    except FileNotFoundError:
        if not os.path.isdir(f"/proc/{pid}"):
            return None
    except (OSError, ValueError, IndexError):
        return None
    import psutil

    try:
        return psutil.Process(pid).memory_full_info().pss / 2**20
    except psutil.Error:
        return None


def cluster_raylets(address: str) -> list[int]:
    """The raylet processes of the running cluster at `address` (host:port of its GCS) on this machine."""
    import psutil

    flag = f"--gcs-address={address}"
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "raylet" and any(flag in arg for arg in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def resolve_address(address: str) -> str:
    """`auto` -> the address of the cluster `ray start` left on this machine; else `address`, once something
    answers there (a Ray driver pointed at nothing retries for many minutes before it fails)."""
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise PipelineError(f"--address {address}: expected HOST:PORT of the cluster's GCS (or auto)")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise PipelineError(f"--address {address}: nothing answers there ({e.strerror or e}); is the cluster "
                                "up (`h2ot cluster status`)?") from None
        return address
    from ray._private.services import canonicalize_bootstrap_address

    found = canonicalize_bootstrap_address("auto")
    if not found:
        raise PipelineError("--address auto: no running Ray cluster on this machine; start one (`ray start --head` "
                            "or `h2ot cluster up`) or give its address")
    return found


# ------------------------------------------------------------------------------------------ one job
def _job_argv(source: str, inputs: list[str] | None, out: str, frames: int, stride: int, use_ray: bool,
              num_cpus: int | None, options: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "jobs.preprocess", "--source", source, "--out", out, "--frames", str(frames),
            "--stride", str(stride), "--no-progress"]
    if inputs:
        argv += ["--input", *inputs]
    if not use_ray:
        argv.append("--no-ray")
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    for key, value in options.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def run_job(argv: list[str], out: str, address: str | None) -> dict[str, Any]:
    """One `h2ot preprocess` job in a fresh process: wall seconds, CPU seconds reaped, peak PSS, manifest."""
    from pipelines.shards import load_manifest

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    raylets: list[int] = []
    if address is not None:
        env["RAY_ADDRESS"] = address
        if address.split(":")[0] in ("127.0.0.1", "localhost"):
            env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray swaps in the interface address
        raylets = cluster_raylets(address)
        if not raylets:
            log.warning("no raylet of %s on this machine: its workers' memory is not counted", address)
    else:
        env.pop("RAY_ADDRESS", None)  # a local Ray of the job's own
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    since = time.time() - 1.0  # process start times are rounded; a worker of this job is never older than this
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PssSampler(proc.pid, raylets, since) as pss:
        try:
            stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise PipelineError(f"`{' '.join(argv[1:4])} ...` ran for more than {JOB_TIMEOUT_S:.0f} s; "
                                "stopped") from None
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise PipelineError(f"`{' '.join(argv[1:4])} ...` failed (exit {proc.returncode}): " + " | ".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": wall, "cpu_reaped": cpu, "peak_pss_mb": pss.peak_mb, "pss_at_peak": pss.at_peak,
            "sampler_cpu_s": pss.sampler_cpu_s, "manifest": load_manifest(out)}


# ------------------------------------------------------------------------------------------ the benchmark
def run_bench(source: str, input: str | None, frames: int = 243, stride: int = 81, num_cpus: int | None = 2,
              workdir: str | None = None, address: str | None = None, copies: int = 1, ray_only: bool = False,
              **options: Any) -> dict[str, Any]:
    """Build the same shards with the single process (unless `ray_only`) and with Ray Data, each as a fresh
    `h2ot preprocess` job, and compare. `address`: run the Ray job on that running cluster; `copies`: N distinct
    files of the input's size (h36m), cached under `workdir` (default: the system's temporary folder)."""
    load_before = list(os.getloadavg())  # the machine may be shared: 1, 5, 15-minute load averages
    cache_root = Path(workdir or tempfile.gettempdir()).resolve()
    inputs = [str(Path(input).resolve())] if input else None  # the jobs run from the repository root
    if copies > 1:
        if source != "h36m" or not inputs:
            raise PipelineError("--copies needs the h36m source and an --input file")
        inputs = write_copies(inputs[0], copies, cache_root / "h2ot-bench-copies")
    address = resolve_address(address) if address else None
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="h2ot-bench-", dir=cache_root)).resolve()
    try:
        runs = {}
        for name, use_ray in (("numpy", False), ("ray", True)):
            if name == "numpy" and ray_only:
                continue
            out = str(tmp / name)
            argv = _job_argv(source, inputs, out, frames, stride, use_ray, None if address else num_cpus, options)
            runs[name] = run_job(argv, out, address if use_ray else None)
        return _figures(runs, source, inputs, frames, stride, num_cpus, address, copies, load_before)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _figures(runs: dict[str, dict[str, Any]], source: str, inputs: list[str] | None, frames: int, stride: int,
             num_cpus: int | None, address: str | None, copies: int, load_before: list[float]) -> dict[str, Any]:
    ray = runs["ray"]
    m_ray = ray["manifest"]
    windows = m_ray["counts"]["train"]["windows"] + m_ray["counts"]["test"]["windows"]
    figures: dict[str, Any] = {
        "source": source, "input": inputs[0] if inputs and len(inputs) == 1 else inputs, "copies": copies,
        "input_bytes": sum(Path(p).stat().st_size for p in inputs or []),
        "address": address, "frames": frames, "stride": stride,
        "num_cpus": None if address else num_cpus, "cluster_cpus": m_ray["timings"].get("cpus"),
        "sequences": m_ray["sequences_written"], "windows": windows,
    }
    if "numpy" in runs:
        m_np = runs["numpy"]["manifest"]
        if m_np["content_hash"] != m_ray["content_hash"]:
            raise PipelineError("the Ray and single-process builds wrote different shards")
        t_np = runs["numpy"]["seconds"]
        figures.update(seconds_numpy=round(t_np, 3), windows_per_s_numpy=round(windows / t_np, 1))
    figures.update(seconds_ray=round(ray["seconds"], 3), windows_per_s_ray=round(windows / ray["seconds"], 1))
    if "numpy" in runs:
        figures["ratio"] = round(runs["numpy"]["seconds"] / ray["seconds"], 3)
    figures.update({
        "bytes_ratio": round(m_ray["bytes_ratio"], 4), "shard_bytes": m_ray["bytes"]["total"],
        "tensor_bytes_raw": m_ray["tensor_bytes_raw"], "same_rows": "numpy" in runs or None,
        "content_hash": m_ray["content_hash"],
    })
    for name, run in runs.items():
        figures[f"peak_pss_mb_{name}"] = round(run["peak_pss_mb"], 1)
    for name, run in runs.items():  # who held it: MB per process in the sample of the peak
        figures[f"pss_at_peak_mb_{name}"] = run["pss_at_peak"]
    # Where the time goes. Seconds include the interpreter's start and imports; inside build_shards:
    # plan_s (listing the input), hash_s / hash_wait_s (hashing it in threads / waiting for that), ray_start_s /
    # ray_stop_s (starting a local Ray, or connecting to a cluster), process_s (the tasks), task_cpu_s and
    # task_plan_s (CPU seconds of the tasks, and their parsing and planning, summed over the workers).
    # cpu_seconds_numpy / seconds_numpy ~ 1: the single-process path keeps one core busy, no more.
    # cpu_seconds_ray_reaped: the Ray job and what it started itself (a local Ray's GCS and raylet; not the
    # workers of a running cluster).
    if "numpy" in runs:
        figures["cpu_seconds_numpy"] = round(runs["numpy"]["cpu_reaped"], 3)
    figures["cpu_seconds_ray_reaped"] = round(ray["cpu_reaped"], 3)
    for name, run in runs.items():
        figures[f"timings_{name}"] = run["manifest"]["timings"]
    figures["pss_sampler_cpu_s"] = round(sum(r["sampler_cpu_s"] for r in runs.values()), 3)
    figures["load_average_before"] = [round(x, 2) for x in load_before]
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures
