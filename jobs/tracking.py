"""MLflow helpers in one place: tracking URI, experiment and run names, and what a training run logs.

The URI: `MLFLOW_TRACKING_URI` wins; otherwise an absolute sqlite file under the run folder
(`sqlite:////abs/RUN_DIR/mlflow.db`), because Ray workers run in other working directories. The driver resolves
the URI and creates the run (no logging); the train loop's rank 0 reopens it by id and logs everything, with the
URI passed to the workers through `RunConfig(worker_runtime_env=...)`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RUN_ID_FILE = "mlflow_run.json"


def tracking_uri(out_dir: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute sqlite path (RUN_DIR/mlflow.db, or ./mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(out_dir) if out_dir is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def git_revision() -> str:
    """The code's git revision (`+dirty` when the tree has changes), or "unknown" outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def schedule_tag(schedule: list[list[int]]) -> str:
    """`full` for an empty schedule, else `b1n27-b2n9` (block, kept tokens per stage)."""
    return "full" if not schedule else "-".join(f"b{b}n{n}" for b, n in schedule)


def run_name(cfg_dict: dict[str, Any], data_dir: str | Path) -> str:
    """What was trained: backbone, size, frames, schedule, data folder, seed (e.g. mixste-d64x4-f27-b1n9-h36m-s0)."""
    m = cfg_dict["model"]
    size = f"d{m['dim']}x{m['depth']}"
    return f"{m['backbone']}-{size}-f{m['frames']}-{schedule_tag(m['schedule'])}-{Path(data_dir).name}" \
           f"-s{cfg_dict['optim']['seed']}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.dim": "64", ...} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def create_run(uri: str, experiment: str, name: str, out_dir: str | Path, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """Create (or, for a rerun of the same RUN_DIR, reuse) an MLflow run; returns its id. Logs nothing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    marker = Path(out_dir) / RUN_ID_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("uri") == uri:
            try:
                client.get_run(saved["run_id"])
                return saved["run_id"]
            except Exception:  # noqa: BLE001 - a deleted run: make a new one
                log.warning("MLflow run %s of %s is gone; starting a new one", saved["run_id"], marker)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"uri": uri, "run_id": run.info.run_id, "experiment": experiment}))
    return run.info.run_id


def end_run(tracking: dict[str, str], failed: bool = False) -> None:
    """Mark the run {uri, run_id} FINISHED (or FAILED), so the MLflow UI does not show it as running."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking["uri"]).set_terminated(tracking["run_id"], "FAILED" if failed else "FINISHED")


class RunLogger:
    """Rank 0's handle on the run the driver created: params once, metrics per epoch, artifacts at the end."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)
