"""MLflow for `h2ot tune`, written only by the driver: one child run per trial under the search's parent run.

Concurrent trials never touch the tracking store (their train loops run with MLflow off); this Tune callback,
in the driver process, creates a trial's child run when it starts, logs each reported epoch, and closes the run
when the trial ends. The trial -> run mapping lives in OUT/mlflow_trials.json, so a resumed search (and the
final `ensure_child_runs` pass, for trials the callback never saw) reuses the same child runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from jobs.tracking import flatten

log = logging.getLogger(__name__)

TRIALS_FILE = "mlflow_trials.json"
LOGGED_METRICS = ("val/mpjpe_mm", "val/p_mpjpe_mm", "val/mpjve_mm", "gflops", "train/loss", "lr",
                  "clips_per_s", "epoch_seconds", "train_time_s")


class ChildRuns:
    """trial_id -> MLflow child run id, persisted in OUT/mlflow_trials.json (the driver is the only writer)."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, out_dir: str | Path):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.path = Path(out_dir) / TRIALS_FILE
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into its experiment state
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def mapping(self) -> dict[str, str]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get_or_create(self, trial_id: str, trial: dict[str, Any], base: dict[str, Any]) -> str:
        from jobs.tracking import schedule_tag

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
        self._log_params(run_id, {"trial": trial, "base": base, "trial_id": trial_id})
        runs[trial_id] = run_id
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(self.path)
        return run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(metrics[k]), now, step) for k in LOGGED_METRICS
                 if isinstance(metrics.get(k), (int, float))]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def finish(self, run_id: str, status: str, final: dict[str, Any] | None = None) -> None:
        if final:
            self.client.log_dict(run_id, final, "final.json")
        self.client.set_terminated(run_id, status)


class MlflowTrialLogger(Callback):
    """Tune callback (driver side): a child run per trial, its per-epoch metrics, its end state."""

    def __init__(self, runs: ChildRuns, base: dict[str, Any]):
        self.runs, self.base = runs, base

    def _run(self, trial: Any) -> str:
        return self.runs.get_or_create(trial.trial_id, trial.config["trial"], self.base)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safe(self._run, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        self._safe(lambda t: self.runs.log_epoch(self._run(t), result, step), trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safe(lambda t: self.runs.finish(self._run(t), "FINISHED", _final(t)), trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safe(lambda t: self.runs.finish(self._run(t), "FAILED", _final(t)), trial)

    @staticmethod
    def _safe(fn: Any, trial: Any) -> None:
        try:
            fn(trial)
        except Exception:  # noqa: BLE001 - tracking must never stop a search; the final pass reconciles
            log.exception("MLflow logging for trial %s failed", trial.trial_id)


def _final(trial: Any) -> dict[str, Any]:
    last = trial.last_result or {}
    return {k: last.get(k) for k in ("epoch", *LOGGED_METRICS) if k in last}
