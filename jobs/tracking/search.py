"""The MLflow side of a Tune search: its parent run (`SearchRun`) and one child run per trial (`ChildRuns`), all
written by the driver, so concurrent trials never lock one sqlite file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.tracking import TRIALS_FILE, _client, _log_new_params, _metric_items, create_run, schedule_tag


class ChildRuns:
    """trial_id -> MLflow child run id under a search's parent run, persisted in OUT/mlflow_trials.json so a
    resumed search reuses the same runs. Only the driver writes (concurrent trials never lock one sqlite file)."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, out_dir: str | Path):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.path = Path(out_dir) / TRIALS_FILE
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into its experiment state
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def mapping(self) -> dict[str, str]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get_or_create(self, trial_id: str, trial: dict[str, Any], base: dict[str, Any]) -> str:
        runs = self.mapping()
        if trial_id in runs:
            return runs[trial_id]
        tags = {"mlflow.parentRunId": self.parent_run_id, "trial_id": trial_id,
                "schedule": schedule_tag(trial["schedule"]), "stages": str(len(trial["schedule"])),
                "tpm": trial["tpm"], "trm": trial["trm"]}
        name = f"{schedule_tag(trial['schedule'])}-{trial['tpm']}-{trial['trm']}-lr{trial['lr']:g}-{trial_id}"
        if trial.get("seed") is not None:
            name, tags["seed"] = f"{name}-s{trial['seed']}", str(trial["seed"])
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        _log_new_params(self.client, run_id, {"trial": trial, "base": base, "trial_id": trial_id})
        runs[trial_id] = run_id
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(self.path)
        return run_id

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        items = _metric_items({k: metrics[k] for k in TRIAL_METRICS if k in metrics}, step)
        if items:
            self.client.log_batch(run_id, metrics=items)

    def finish(self, run_id: str, status: str, final: dict[str, Any] | None = None) -> None:
        if final:
            self.client.log_dict(run_id, final, "final.json")
        self.client.set_terminated(run_id, status)

    def reconcile(self, rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
        """Every trial row gets its child run with its per-epoch metrics and final figures, even one the live
        callback missed (e.g. it finished just before the driver was killed)."""
        for r in rows:
            run_id = self.get_or_create(r["trial_id"], {k: r[k] for k in ("schedule", "tpm", "trm", "lr", "seed")},
                                        base)
            if not self.client.get_metric_history(run_id, "val/mpjpe_mm"):
                for h in r["history"]:
                    self.log_epoch(run_id, h, int(h["epoch"]))
            final = {"final/mpjpe_mm": r["mpjpe_mm"], "final/gflops": r["gflops"],
                     "final/gflops_predicted": r["gflops_predicted"], "final/epochs": r["epochs"]}
            self.client.log_batch(run_id, metrics=_metric_items(final, 0, finite_only=True))
            self.client.set_tag(run_id, "status", r["status"])
            self.client.set_tag(run_id, "pareto", str(r["pareto"]))
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "FAILED" if r["status"] == "error" else "FINISHED")


TRIAL_METRICS = ("val/mpjpe_mm", "val/p_mpjpe_mm", "val/mpjve_mm", "gflops", "train/loss", "lr",
                 "clips_per_s", "epoch_seconds", "train_time_s")


class SearchRun:
    """A Tune search's parent run (its plan, Pareto table, plot, summary) and its child runs, one per trial."""

    def __init__(self, uri: str, experiment: str, name: str, out_dir: str | Path, tags: dict[str, str]):
        self.run_id = create_run(uri, experiment, name, out_dir, tags)
        self.client = _client(uri)
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        self.children = ChildRuns(uri, experiment_id, self.run_id, out_dir)

    def log_plan(self, params: dict[str, Any], plan: dict[str, Any]) -> None:
        """The search's settings (params once: a resumed search keeps its first values) and search.json."""
        _log_new_params(self.client, self.run_id, params)
        self.client.log_dict(self.run_id, plan, "search.json")

    def log_report(self, files: list[Path], summary: dict[str, Any], metrics: dict[str, float]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.log_dict(self.run_id, summary, "summary.json")
        if metrics:
            self.client.log_batch(self.run_id, metrics=_metric_items(metrics, 0, finite_only=True))

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")
