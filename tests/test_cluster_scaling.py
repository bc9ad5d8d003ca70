"""Fast checks of `h2ot bench-preprocess-scaling` without a cluster: the job's JSON, the settings loop (clusters
always stopped, shards compared), the per-node task breakdown, and which job runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import local
from jobs import bench_preprocess_scaling as scaling

HASH_A, HASH_B = "a" * 64, "b" * 64


def _figures(windows_per_s: float, content_hash: str = HASH_A) -> dict:
    return {"windows": 1000, "seconds_ray": round(1000 / windows_per_s, 3), "windows_per_s_ray": windows_per_s,
            "content_hash": content_hash, "peak_pss_mb_ray": 900.0}


def test_parse_job_figures_takes_the_last_json_line_among_log_lines() -> None:
    stdout = "\n".join(["2026-12-02 INFO worker.py -- Connected to Ray cluster", '{"note": "not this one"}',
                        json.dumps(_figures(500.0)), "some trailing log line"])
    figures = scaling.parse_job_figures(stdout)
    assert figures["windows_per_s_ray"] == 500.0 and figures["content_hash"] == HASH_A


def test_parse_job_figures_names_what_is_missing() -> None:
    with pytest.raises(scaling.ScalingError, match=r"lacks \['content_hash'\]"):
        scaling.parse_job_figures(json.dumps({k: 1 for k in ("windows", "seconds_ray", "windows_per_s_ray")}))
    with pytest.raises(scaling.ScalingError, match=r"no JSON object; its output ends: starting \| {not json \| oops"):
        scaling.parse_job_figures("starting\n{not json\noops")


class FakeClusters:
    """start/stop/measure of run_scaling, recording what was started and stopped."""

    def __init__(self, results: dict[int, dict], fail_on: int | None = None) -> None:
        self.results, self.fail_on, self.started, self.stopped = results, fail_on, [], []

    def start(self, workers: int) -> dict:
        self.started.append(workers)
        return {"workers": workers}

    def stop(self, state: dict) -> None:
        self.stopped.append(state["workers"])

    def measure(self, state: dict) -> dict:
        if state["workers"] == self.fail_on:
            raise scaling.ScalingError("the job failed (exit 2)")
        return dict(self.results[state["workers"]])


def test_run_scaling_reports_each_setting_and_the_ratio_to_the_first() -> None:
    fake = FakeClusters({1: _figures(400.0), 2: _figures(700.0)})
    out = scaling.run_scaling([1, 2], fake.start, fake.stop, fake.measure)
    assert fake.started == fake.stopped == [1, 2]
    assert out["windows_per_s"] == {"1": 400.0, "2": 700.0}
    assert out["ratio_2_vs_1"] == 1.75
    assert out["same_shards"] is True and out["content_hash"] == HASH_A and out["windows"] == 1000
    assert [s["workers"] for s in out["settings"]] == [1, 2]
    assert len(out["load_average_before"]) == len(out["load_average_after"]) == 3


def test_run_scaling_fails_loudly_when_the_shards_differ() -> None:
    fake = FakeClusters({1: _figures(400.0, HASH_A), 2: _figures(700.0, HASH_B)})
    with pytest.raises(scaling.ScalingError, match=f"different shards.*1: {HASH_A}, 2: {HASH_B}"):
        scaling.run_scaling([1, 2], fake.start, fake.stop, fake.measure)
    assert fake.stopped == [1, 2]


def test_run_scaling_stops_the_cluster_of_a_failed_job_and_starts_no_other() -> None:
    fake = FakeClusters({1: _figures(400.0), 2: _figures(700.0)}, fail_on=1)
    with pytest.raises(scaling.ScalingError, match="exit 2"):
        scaling.run_scaling([1, 2], fake.start, fake.stop, fake.measure)
    assert fake.started == fake.stopped == [1]


def _task(node: str, created: float, running: float, finished: float) -> scaling.TaskRecord:
    return scaling.TaskRecord(node, [("PENDING_ARGS_AVAIL", created), ("PENDING_NODE_ASSIGNMENT", created),
                                     ("SUBMITTED_TO_WORKER", running - 10), ("RUNNING", running),
                                     ("FINISHED", finished)])


def test_summarize_tasks_per_node_states_idle_time_and_tail() -> None:
    """w1 runs 0-1000 and 1000-3000 ms; w2 starts late (2000) and runs to 2500; all three queued from 0 ms:
    w2 sat idle 2 s while tasks waited, and 0.5 s at the end while w1 finished."""
    tasks = [_task("w1", 0, 10, 1000), _task("w1", 0, 1010, 3000), _task("w2", 0, 2000, 2500)]
    out = scaling.summarize_tasks(tasks, {"head": 0.0, "w1": 1.0, "w2": 1.0})
    head, w1, w2 = out["nodes"]["head"], out["nodes"]["w1"], out["nodes"]["w2"]
    assert out["span_s"] == 3.0
    assert head["tasks"] == 0 and head["idle_while_queued_s"] is None and head["busy_fraction"] == 0.0
    assert w1["tasks"] == 2 and w2["tasks"] == 1
    assert w1["state_s"]["RUNNING"] == pytest.approx(2.98) and w2["state_s"]["PENDING_NODE_ASSIGNMENT"] == 1.99
    assert w1["first_task_s"] == 0.99 and w1["median_task_s"] == pytest.approx(1.49)
    assert w2["idle_while_queued_s"] == pytest.approx(1.99, abs=0.02)  # waiting tasks, w2 not yet running any
    assert w1["idle_while_queued_s"] == pytest.approx(0.01, abs=0.02)
    assert w2["idle_at_end_s"] == 0.5 and w1["idle_at_end_s"] == 0.0


def test_summarize_tasks_without_tasks_lists_the_nodes() -> None:
    out = scaling.summarize_tasks([], {"head": 0.0, "w1": 1.0})
    assert out == {"span_s": 0.0, "nodes": {"head": {"tasks": 0, "state_s": {}}, "w1": {"tasks": 0, "state_s": {}}}}


def test_bench_preprocess_job_runs_the_ray_only_bench_on_the_head(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    def fake_run_driver(state, argv, timeout_s=0):
        seen["argv"] = argv
        return "log line\n" + json.dumps(_figures(321.0))

    monkeypatch.setattr(scaling, "run_driver", fake_run_driver)
    state = local.ClusterState(id="x", mode="netns", state_dir=str(tmp_path), cpus_per_node=1.0, gcs_port=26391,
                               dashboard_port=1, mlflow_port=2, nodes=[local.NodeState("head", "10.0.0.2")])
    figures = scaling.bench_preprocess_job(10, tmp_path, "/data/h36m.npz")(state)
    assert figures["windows_per_s_ray"] == 321.0
    assert seen["argv"][:5] == [sys.executable, "-m", "jobs.cli", "bench-preprocess", "--address"]
    argv = " ".join(seen["argv"])
    assert f"--address 10.0.0.2:26391 --copies 10 --ray-only --json --workdir {tmp_path}" in argv
    assert argv.endswith("--input /data/h36m.npz")


def test_choose_job_falls_back_to_preprocess_for_one_copy_only(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(scaling, "has_ray_only_bench", lambda: False)
    args = scaling.parse_args(["--copies", "10"])
    with pytest.raises(scaling.UserError, match="--copies 10 needs `h2ot bench-preprocess --ray-only --copies`"):
        scaling.choose_job(args, "/data/h36m.npz", tmp_path)
    assert scaling.choose_job(scaling.parse_args(["--copies", "1"]), "/x.npz", tmp_path)[0] == "preprocess"
    monkeypatch.setattr(scaling, "has_ray_only_bench", lambda: True)
    assert scaling.choose_job(args, "/x.npz", tmp_path)[0] == "bench-preprocess"


@pytest.mark.parametrize("text", ["", "0,1", "one,two"])
def test_worker_counts_must_be_positive_integers(text: str) -> None:
    with pytest.raises(scaling.UserError, match="--workers"):
        scaling.worker_counts(text)
    assert scaling.worker_counts("1, 2,4") == [1, 2, 4]


def test_main_prints_the_figures_and_exits_2_on_a_hash_mismatch(monkeypatch, tmp_path: Path, capsys) -> None:
    data = tmp_path / "h36m.npz"
    data.write_bytes(b"npz")
    results = {1: _figures(400.0), 2: _figures(600.0)}
    monkeypatch.setattr(scaling, "choose_job", lambda args, input, workdir: ("bench-preprocess", None))
    monkeypatch.setattr(scaling, "cluster_starter", lambda args, state_dir: (lambda n: {"workers": n}, lambda s: None))
    monkeypatch.setattr(scaling, "measure_setting", lambda state, job: dict(results[state["workers"]]))
    argv = ["--input", str(data), "--workdir", str(tmp_path / "work"), "--json"]
    assert scaling.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratio_2_vs_1"] == 1.5 and out["head_cpus"] == 0 and out["copies"] == 10
    results[2] = _figures(600.0, HASH_B)
    assert scaling.main(argv) == 2
    assert "different shards" in capsys.readouterr().err


def test_pss_of_this_process_is_counted_and_gone_processes_are_skipped() -> None:
    mine = scaling.pss_mb([os.getpid()])
    assert mine > 1.0
    assert scaling.pss_mb([os.getpid(), 2**22 + 7]) == pytest.approx(mine, rel=0.2)


def test_cluster_sampler_counts_the_cpu_and_memory_of_marked_processes_only(tmp_path: Path) -> None:
    """A marked process that burns ~0.6 s of CPU after the sampling began is counted (under `other`, its role);
    an unmarked one beside it is not."""
    marker = "scal" + os.urandom(3).hex()
    go = tmp_path / "go"  # the processes burn only once the sampler has seen them (no race on a loaded machine)
    burn = (f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
            "t = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)")
    env = {**os.environ, local.MARKER: marker}
    with scaling.ClusterSampler(marker, interval_s=0.1) as sampler:
        procs = [subprocess.Popen([sys.executable, "-c", burn], env=env),
                 subprocess.Popen([sys.executable, "-c", burn])]
        time.sleep(1.0)
        go.touch()
        try:
            deadline = time.monotonic() + 30
            while sampler.cpu_s_by_role.get("other", 0) < 0.55 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    assert 0.55 <= sampler.cpu_s_by_role["other"] < 1.2  # one process's 0.6 s, not two
    assert sampler.peak_mb > 1.0 and 0 < sampler.sampler_cpu_s < 5
    assert scaling.process_role(os.getpid()) == "other" and scaling.process_role(2**22 + 7) is None


@pytest.mark.parametrize("argv, role", [
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/x",
      "--python_worker_command=python default_worker.py ray::"], "raylet"),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/x"], "gcs"),
    (["ray::DashboardAgent", ""], "dashboard agent"),
    (["ray::IDLE"], "ray task workers"),
    (["ray::Map(work)"], "ray task workers"),
    (["ray::_StatsActor"], "ray data helper actors"),
    (["/venv/bin/python", "-m", "jobs.cli", "bench-preprocess", "--address", "10.0.0.2:6379"],
     "bench-preprocess (timer, PSS sampler)"),
    (["/venv/bin/python", "-m", "jobs.preprocess", "--source", "h36m"], "job driver"),
    (["/venv/bin/python", "/venv/bin/ray", "start", "--block", "--num-cpus=0"], "ray start --block"),
    (["/venv/bin/python", "-c", "from multiprocessing.forkserver import main"], "other"),
    (["/venv/bin/python", "-m", "uvicorn", "mlflow.server.fastapi_app:app"], "mlflow"),
])
def test_role_of_reads_the_command_line(argv: list[str], role: str) -> None:
    assert scaling.role_of(argv) == role


def test_cli_lists_the_scaling_bench() -> None:
    from jobs.cli import SUBCOMMANDS

    assert SUBCOMMANDS["bench-preprocess-scaling"][0] == "jobs.bench_preprocess_scaling"
