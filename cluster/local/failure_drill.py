"""Failure drill on the local multi-node cluster: kill the worker node's raylet while training runs.

    sudo .venv/bin/python cluster/local/failure_drill.py [--epochs 6] [--keep]

1. `h2ot cluster up` (head + 1 worker node in network namespaces, MLflow), preprocess a small synthetic set.
2. Submit training (2 Ray Train workers, one per node) and wait until it has written a checkpoint.
3. SIGKILL the worker node's raylet; wait for the job's outcome (finished after a restart, or a clear failure).
4. Check that the checkpoints written before the kill are intact (every file readable, state.pt loads).
5. `h2ot cluster restart-node w1`, resubmit the same training (same run name and storage path): it must resume
   from the last checkpoint and finish, without redoing finished epochs (MLflow's epoch metric has each step once).
Prints a JSON report (also written to <work>/drill.json). Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import cluster  # noqa: E402

RUN_NAME = "drill"
EXPERIMENT = "h2ot-drill"


def submit(client, entrypoint: str):
    return client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT), "excludes": [".git", ".venv", "outputs", "runs", "*.db"]},
    )


def wait(client, job_id: str, timeout_s: float = 600):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.get_job_info(job_id)
        if info.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return info
        time.sleep(2)
    client.stop_job(job_id)
    return client.get_job_info(job_id)


def checkpoints(storage: Path) -> list[Path]:
    return sorted(p for p in (storage / RUN_NAME).glob("checkpoint_*") if p.is_dir())


def checkpoint_epoch(ckpt: Path) -> int | None:
    import torch

    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    return int(state["epoch"]) if "epoch" in state else None


def raylet_pid(state: cluster.ClusterState, node_name: str) -> int:
    node = next(n for n in state.nodes if n.name == node_name)
    pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        try:
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if exe.endswith(b"/raylet"):
            return pid
    raise RuntimeError(f"no raylet in namespace {node.netns}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--work", type=Path, default=None, help="folder for data, runs, state (default: a temp dir)")
    p.add_argument("--subnet", default="10.213.9.0/24")
    p.add_argument("--mlflow-port", type=int, default=15099)
    args = p.parse_args()
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    work = args.work or Path(tempfile.mkdtemp(prefix="h2ot-drill-"))
    state_dir, data, out, storage = work / "cluster", work / "data", work / "train", work / "ray-results"
    report: dict = {"work": str(work)}
    t0 = time.monotonic()
    try:
        state = cluster.up(
            state_dir,
            workers=1,
            cpus_per_node=3,
            mlflow_port=args.mlflow_port,
            subnet=args.subnet,
            netns=True,
            timeout_s=400,
        )
        os.environ.update(state.client_env())
        # Ray may have cached its auth mode before the env changed: send the cluster's token explicitly.
        token = Path(state.token_path).read_text().strip()
        client = JobSubmissionClient(state.dashboard_url, headers={"Authorization": f"Bearer {token}"})
        info = wait(
            client,
            submit(
                client,
                f"python -m jobs.preprocess --source synthetic --out {data} --frames 27 "
                "--stride 27 --cameras 2 --no-progress --set synthetic_subjects=3 "
                "--set synthetic_frames=200",
            ),
        )
        assert info.status == "SUCCEEDED", info.message
        train = (
            f"python -m jobs.train --config configs/tiny.yaml --data {data} --out {out} "
            f"--set run.name={RUN_NAME} --set run.experiment={EXPERIMENT} --set run.storage_path={storage} "
            f"--set scaling.cpus_per_worker=2 --set optim.epochs={args.epochs}"
        )
        job = submit(client, train)
        while not checkpoints(storage):  # wait for the first checkpoint (end of epoch 1)
            status = client.get_job_status(job)
            assert status in ("PENDING", "RUNNING"), f"training ended before a checkpoint: {status}"
            time.sleep(1)
        before = {c.name: checkpoint_epoch(c) for c in checkpoints(storage)}
        pid = raylet_pid(state, "w1")
        os.kill(pid, 9)
        report["killed"] = {"raylet_pid": pid, "at_s": round(time.monotonic() - t0, 1), "checkpoints": before}
        info = wait(client, job)
        report["first_job"] = {
            "status": str(info.status),
            "message": (info.message or "")[-600:],
            "ended_s": round(time.monotonic() - t0, 1),
        }
        report["first_job"]["log_tail"] = client.get_job_logs(job)[-1500:]
        after = {}
        for c in checkpoints(storage):
            after[c.name] = checkpoint_epoch(c)  # raises if a file is torn
        report["checkpoints_after_failure"] = after
        report["checkpoints_intact"] = all(after.get(k) == v for k, v in before.items() if k in after)

        cluster.restart_node(state_dir, "w1")
        report["node_back_s"] = round(time.monotonic() - t0, 1)
        job2 = submit(client, train)
        info2 = wait(client, job2)
        logs2 = client.get_job_logs(job2)
        report["resubmitted_job"] = {
            "status": str(info2.status),
            "message": (info2.message or "")[-600:],
            "resumed_lines": [ln for ln in logs2.splitlines() if "resumed" in ln][:4],
            "ended_s": round(time.monotonic() - t0, 1),
        }
        mlflow = MlflowClient(state.mlflow_url)
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        runs = mlflow.search_runs([exp.experiment_id])
        report["mlflow_runs"] = len(runs)
        steps = sorted(m.step for r in runs for m in mlflow.get_metric_history(r.info.run_id, "val/mpjpe_mm"))
        report["val_metric_steps"] = steps
        report["epochs_redone"] = len(steps) - len(set(steps))
        report["final_checkpoint_epoch"] = max(checkpoint_epoch(c) or 0 for c in checkpoints(storage))
    finally:
        cluster.down(state_dir)
        report["total_s"] = round(time.monotonic() - t0, 1)
        (work / "drill.json").write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
