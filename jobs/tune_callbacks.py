"""Tune callbacks of `h2ot tune`, run in the driver: a child MLflow run per trial (written through
`jobs.tracking.search.ChildRuns`), and a progress line each time a trial ends.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune import Callback

from jobs.tracking import schedule_tag
from jobs.tracking.search import TRIAL_METRICS, ChildRuns

log = logging.getLogger("jobs.tune")

ENDED = ("TERMINATED", "ERROR")  # Trial statuses of a trial that will not run again in this search


class MlflowTrialLogger(Callback):
    """A child run per trial, its per-epoch metrics, its end state; a tracking failure never stops the search
    (the final pass, `ChildRuns.reconcile`, fills in what was missed)."""

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


class TrialProgress(Callback):
    """As each trial ends: `trials ended/total` and the best trial so far (its best epoch's metric)."""

    def __init__(self, total: int, metric: str = "val/mpjpe_mm"):
        self.total, self.metric = total, metric

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info(self.line(trials, trial, "finished"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info(self.line(trials, trial, "FAILED"))

    def line(self, trials: list, trial: Any, how: str) -> str:
        ended = {t.trial_id for t in trials if t.status in ENDED} | {trial.trial_id}
        text = f"trial {trial.trial_id} {how} ({self._point(trial)}); {len(ended)}/{self.total} trials ended"
        scored = [(self._best(t), t) for t in trials if math.isfinite(self._best(t))]
        if scored:
            _, best = min(scored, key=lambda s: s[0])
            text += f"; best so far: {best.trial_id} ({self._point(best)})"
        return text

    def _best(self, trial: Any) -> float:
        value = (trial.metric_analysis or {}).get(self.metric, {}).get("min")
        return float(value) if isinstance(value, (int, float)) else math.nan

    def _point(self, trial: Any) -> str:
        drawn = trial.config.get("trial", {})
        last = trial.last_result or {}
        gflops = last.get("gflops")
        return " ".join(filter(None, [
            schedule_tag(drawn["schedule"]) if "schedule" in drawn else None, drawn.get("tpm"), drawn.get("trm"),
            f"lr {drawn['lr']:g}" if "lr" in drawn else None,
            f"{self.metric} {self._best(trial):.2f}" if math.isfinite(self._best(trial)) else "no result",
            f"at {gflops:.4f} GFLOPs" if isinstance(gflops, (int, float)) else None,
            f"after {last['epoch']} epoch(s)" if "epoch" in last else None]))


def _final(trial: Any) -> dict[str, Any]:
    last = trial.last_result or {}
    return {k: last.get(k) for k in ("epoch", *TRIAL_METRICS) if k in last}
