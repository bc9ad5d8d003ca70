"""Failure drill on the local multi-node cluster: kill the worker node's raylet while training runs.

    sudo .venv/bin/python cluster/local/failure_drill.py [--epochs 6] [--work DIR]

1. `h2ot cluster up` (head + 1 worker node in network namespaces, MLflow), preprocess a small synthetic set.
2. Submit training (2 Ray Train workers, one per node) and wait until it has written a checkpoint (committed:
   listed in Ray Train's checkpoint_manager_snapshot.json, the list a resumed run starts from).
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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cluster import local as cluster  # noqa: E402

RUN_NAME = "drill"
EXPERIMENT = "h2ot-drill"
T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress on stderr (the JSON report goes to stdout): a timeout then shows where the drill waited."""
    print(f"[drill {time.monotonic() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def submit(client, entrypoint: str):
    return client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT), "excludes": [".git", ".venv", "outputs", "runs", "*.db"]},
    )


def wait(client, job_id: str, timeout_s: float = 600):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        info = client.get_job_info(job_id)
        if info.status != last:
            say(f"job {job_id}: {info.status}")
            last = info.status
        if info.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return info
        time.sleep(2)
    say(f"job {job_id}: still {last} after {timeout_s:.0f} s; stopping it")
    client.stop_job(job_id)
    return client.get_job_info(job_id)


def checkpoints(storage: Path) -> list[Path]:
    return sorted(p for p in (storage / RUN_NAME).glob("checkpoint_*") if p.is_dir())


def registered(storage: Path) -> list[str]:
    """Checkpoints Ray Train has committed (its checkpoint_manager_snapshot.json), oldest first.

    A checkpoint folder appears (rank 0 uploads it) before the controller registers it; one that is never
    registered (the node died in between) is ignored on resume. So "written" means listed here.
    """
    path = storage / RUN_NAME / "checkpoint_manager_snapshot.json"
    try:
        snap = json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or read while being replaced
        return []
    return sorted(r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", []))


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def error_lines(logs: str) -> list[str]:
    """The lines of a job's logs that say why it failed (Ray Train's failure policy, the raised error)."""
    keep = ("[FailurePolicy]", "Source:", "Error count:", "RuntimeError", "ray.train", "error:")
    return [ln.strip()[:400] for ln in plain(logs).splitlines() if any(k in ln for k in keep)][-12:]


def val_steps(mlflow, experiment: str) -> list[int]:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id])
    return sorted(m.step for r in runs for m in mlflow.get_metric_history(r.info.run_id, "val/mpjpe_mm"))


def checkpoint_epoch(ckpt: Path) -> int | None:
    """The (1-based) epoch a checkpoint ends, from its state.pt (0-based there); raises if a file is torn."""
    import torch

    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    return int(state["epoch"]) + 1 if "epoch" in state else None


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
    p.add_argument("--job-timeout", type=float, default=600, help="seconds to wait for each job (then stop it)")
    args = p.parse_args()
    import torch  # noqa: F401  (imported now, so that reading checkpoints later does not delay the kill)
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    work = args.work or Path(tempfile.mkdtemp(prefix="h2ot-drill-"))
    state_dir, data, out, storage = work / "cluster", work / "data", work / "train", work / "ray-results"
    report: dict = {"work": str(work)}
    global T0
    t0 = T0 = time.monotonic()
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
        say(f"cluster {state.id} up: {[n.ip for n in state.nodes]}")
        os.environ.update(state.client_env())
        client = JobSubmissionClient(state.dashboard_url, headers=state.auth_headers())
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
            f"--set scaling.cpus_per_worker=2 --set optim.epochs={args.epochs} "
            # Ray Train retries a worker-group start that finds no room every 60 s, forever by default: after the
            # node is lost that would leave the job RUNNING until the node is back. Fail after the second timeout.
            "--set run.max_startup_failures=1"
        )
        pid = raylet_pid(state, "w1")
        job = submit(client, train)
        say(f"training job {job} submitted; waiting for its first checkpoint")
        deadline = time.monotonic() + args.job_timeout
        while not registered(storage):  # wait for the first committed checkpoint (end of epoch 1)
            status = client.get_job_status(job)
            assert status in ("PENDING", "RUNNING"), f"training ended before a checkpoint: {status}"
            assert time.monotonic() < deadline, (
                f"no checkpoint after {args.job_timeout:.0f} s (job {status}); logs:\n"
                + client.get_job_logs(job)[-3000:]
            )
            time.sleep(0.2)
        os.kill(pid, 9)  # at once: an epoch of configs/tiny.yaml takes about a second
        killed_at = time.monotonic()
        names, folders = registered(storage), [c.name for c in checkpoints(storage)]
        report["killed"] = {"raylet_pid": pid, "at_s": round(killed_at - t0, 1),
                            "job_status_at_kill": str(client.get_job_status(job)),
                            "unregistered_folders": sorted(set(folders) - set(names))}
        say(f"killed raylet {pid} of w1; committed checkpoints then: {names}")
        # The head's view: how long until the worker node is declared dead.
        w1_ip = next(n.ip for n in state.nodes if n.name == "w1")
        while time.monotonic() - killed_at < 120 and any(n["node_ip"] == w1_ip for n in cluster.alive_nodes(state)):
            time.sleep(0.5)
        report["killed"]["node_dead_after_s"] = round(time.monotonic() - killed_at, 1)
        report["killed"]["checkpoints"] = before = {n: checkpoint_epoch(storage / RUN_NAME / n) for n in names}
        info = wait(client, job, args.job_timeout)
        logs1 = client.get_job_logs(job)
        report["first_job"] = {
            "status": str(info.status),
            "ended_s": round(time.monotonic() - t0, 1),
            "ended_after_kill_s": round(time.monotonic() - killed_at, 1),
            "message_head": plain(info.message or "").split("\n")[0][:300],
            "error_lines": error_lines(logs1),
        }
        after = {}
        for c in checkpoints(storage):
            after[c.name] = checkpoint_epoch(c)  # raises if a file is torn
        report["checkpoints_after_failure"] = after
        report["checkpoints_registered_after_failure"] = registered(storage)
        report["checkpoints_intact"] = all(after.get(k) == v for k, v in before.items())

        mlflow = MlflowClient(state.mlflow_url)
        steps1 = val_steps(mlflow, EXPERIMENT)
        report["val_steps_first_job"] = steps1
        say(f"checkpoints after the failure: {after}; restarting node w1")
        cluster.restart_node(state_dir, "w1")
        report["node_back_s"] = round(time.monotonic() - t0, 1)
        job2 = submit(client, train)
        info2 = wait(client, job2, args.job_timeout)
        logs2 = plain(client.get_job_logs(job2))
        report["resubmitted_job"] = {
            "status": str(info2.status),
            "message_head": plain(info2.message or "").split("\n")[0][:300],
            "resumed_lines": [ln.strip() for ln in logs2.splitlines() if "resumed" in ln][:4],
            "ended_s": round(time.monotonic() - t0, 1),
        }
        steps = val_steps(mlflow, EXPERIMENT)
        new = list(steps)
        for step in steps1:
            new.remove(step)
        last_done = max(before.values()) if before else 0  # the last epoch committed before the kill
        report["mlflow_runs"] = len(mlflow.search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id]))
        report["val_steps_resubmitted_job"] = new
        report["last_committed_epoch_before_kill"] = last_done
        report["resumed_after_epoch"] = min(new) - 1 if new else None
        report["epochs_redone"] = sum(1 for s in new if s <= last_done)  # committed epochs trained again
        report["val_steps_logged_twice"] = len(steps) - len(set(steps))  # incl. an epoch logged, not committed
        report["final_checkpoint_epoch"] = max(checkpoint_epoch(c) or 0 for c in checkpoints(storage))
    finally:
        say("stopping the cluster")
        cluster.down(state_dir)
        report["total_s"] = round(time.monotonic() - t0, 1)
        (work / "drill.json").write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
