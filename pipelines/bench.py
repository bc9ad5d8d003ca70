"""Benchmark: the Ray Data pipeline vs a plain single-process loop on the same input (`run_bench`; the command
line is `h2ot bench-preprocess`, jobs/bench_preprocess.py).

Fair by construction: both paths run `pipelines.build.build_shards` with the same config, so they call the
same per-sequence functions (`process_group` -> `prepare_sequence` -> windows -> `write_shard`) and the same
Parquet writer settings; each path runs in a fresh Python process and its timing includes all of its start-up
(interpreter, imports, parsing and hashing the input, and for Ray `ray.init`, worker start and shutdown).
The rows are checked to be the same: both builds must have the same content hash (byte-identical shard files).
Prints windows_per_s_ray, windows_per_s_numpy, ratio and bytes_ratio = shard bytes / float32 bytes of the
tensor columns (valid counted at its 1 byte), plus where the time went (CPU seconds, per-phase timings).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD = "import sys; from pipelines.bench import build_child; sys.exit(build_child(sys.argv[1]))"


def _build_in_child(cfg: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """One build in a fresh Python process, as a user's `h2ot preprocess` run: (wall s, CPU s, manifest).

    Nothing is shared between the two paths (imports, the parsed input, Ray). CPU seconds are those of the
    child and every process it and its children waited for (for Ray: the driver, GCS, raylet and workers).
    """
    from pipelines.records import PipelineError
    from pipelines.shards import load_manifest

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise PipelineError(f"the {'Ray' if cfg['use_ray'] else 'single-process'} build failed "
                            f"(exit {proc.returncode}): " + " | ".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, load_manifest(cfg["out"])


def run_bench(source: str, input: str | None, frames: int = 243, stride: int = 81, num_cpus: int | None = 2,
              workdir: str | None = None, **options: Any) -> dict[str, Any]:
    """Build the same shards twice (single process, then Ray Data), each in a fresh process; compare."""
    import dataclasses

    from pipelines.config import PreprocessConfig

    load_before = list(os.getloadavg())  # the machine may be shared: 1, 5, 15-minute load averages
    tmp = Path(tempfile.mkdtemp(prefix="h2ot-bench-", dir=workdir)).resolve()
    input = str(Path(input).resolve()) if input else None  # the children run from the repository root
    try:
        results = {}
        for name, use_ray in (("numpy", False), ("ray", True)):
            cfg = PreprocessConfig(source=source, input=input, out=str(tmp / name), frames=frames, stride=stride,
                                   use_ray=use_ray, num_cpus=num_cpus, progress=False, **options)
            results[name] = _build_in_child(dataclasses.asdict(cfg))
        (t_np, cpu_np, m_np), (t_ray, cpu_ray, m_ray) = results["numpy"], results["ray"]
        windows = m_np["counts"]["train"]["windows"] + m_np["counts"]["test"]["windows"]
        if m_np["content_hash"] != m_ray["content_hash"]:
            raise RuntimeError("the Ray and single-process builds wrote different shards")
        return {
            "source": source, "input": input, "frames": frames, "stride": stride, "num_cpus": num_cpus,
            "sequences": m_np["sequences_written"], "windows": windows,
            "seconds_numpy": round(t_np, 3), "seconds_ray": round(t_ray, 3),
            "windows_per_s_numpy": round(windows / t_np, 1), "windows_per_s_ray": round(windows / t_ray, 1),
            "ratio": round(t_np / t_ray, 3), "bytes_ratio": round(m_np["bytes_ratio"], 4),
            "shard_bytes": m_np["bytes"]["total"], "tensor_bytes_raw": m_np["tensor_bytes_raw"],
            "same_rows": True, "content_hash": m_np["content_hash"],
            # Where the time goes. Seconds include the interpreter's start and imports; inside build_shards:
            # plan_s (parse + hash the input), ray_start_s / ray_stop_s, process_s (the groups themselves),
            # task_cpu_s (CPU seconds of processing the groups, summed over the workers for Ray).
            # cpu_seconds_numpy / seconds_numpy ~ 1: the single-process path keeps one core busy, no more.
            # cpu_seconds_ray_reaped: the Ray driver, GCS and raylet (Ray's workers are not reaped by us).
            "cpu_seconds_numpy": round(cpu_np, 3), "cpu_seconds_ray_reaped": round(cpu_ray, 3),
            "timings_numpy": m_np["timings"], "timings_ray": m_ray["timings"],
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_child(config_json: str) -> int:
    """One timed build, in the fresh process `_build_in_child` starts: 0, or 2 with the error on stderr."""
    import logging

    from pipelines.build import build_shards
    from pipelines.config import PreprocessConfig
    from pipelines.records import PipelineError

    logging.basicConfig(level=logging.WARNING)
    try:
        build_shards(config=PreprocessConfig(**json.loads(config_json)))
    except PipelineError as e:  # its last lines of stderr become the parent's error message
        logging.getLogger(__name__).error("%s", e)
        return 2
    return 0
