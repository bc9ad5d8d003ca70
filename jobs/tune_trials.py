"""The search of `h2ot tune`, apart from its CLI: the trials (drawn before Ray starts), the resources each gets,
the function a trial runs, and the table of results.

The trials are drawn by `jobs.tune_search.sample_trials` (valid by construction, the `include` anchors first) and
handed to Tune as a grid, so an invalid space fails in a second with the field named and the same seed gives
the same trials. Each trial trains the base train config with its drawn schedule, TPM, TRM and lr through the
same Ray Train loop as `h2ot train` (a function trainable that runs a TorchTrainer).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from jobs.settings import TrainConfig, train_config_from_dict
from jobs.tune_search import TuneConfig, TuneSettings, load_tune_config, sample_trials

# The trial function only drives a TorchTrainer, whose workers hold the CPUs; a whole CPU per trial would leave
# those CPUs idle on a small machine.
TRIAL_CPU = 0.01
STARTS_DIR = "trial_starts"  # one file per trial id, a line per (re)start: what the resume test checks


def load_search(config: str | Path,
                overrides: list[str] | None = None) -> tuple[TuneConfig, TrainConfig, list[dict[str, Any]]]:
    """(TuneConfig, base TrainConfig, trials): everything checked before Ray starts."""
    tcfg = load_tune_config(config, overrides)
    base = tcfg.base_config()
    trials = sample_trials(tcfg.space, base.model, tcfg.tune, base.optim.lr)
    return tcfg, base, trials


def search_name(tcfg: TuneConfig, config: str | Path) -> str:
    return tcfg.name or Path(config).stem


def trial_train_config(base: dict[str, Any], trial: dict[str, Any]) -> TrainConfig:
    """The TrainConfig one trial trains: the base with the drawn schedule, strategies and lr."""
    cfg = train_config_from_dict(base)
    cfg.model.schedule = [list(s) for s in trial["schedule"]]
    cfg.model.tpm, cfg.model.trm, cfg.optim.lr = trial["tpm"], trial["trm"], float(trial["lr"])
    if trial.get("seed") is not None:
        cfg.optim.seed = int(trial["seed"])
    return cfg


def plan_resources(base: TrainConfig, settings: TuneSettings, cluster: dict[str, float]) -> dict[str, Any]:
    """Workers per trial and concurrent trials that fit the cluster (`ray.cluster_resources()`).

    Workers: tune.workers_per_trial, else the base config's, lowered until one trial fits the CPUs left after
    tune.reserve_cpus (Ray Data's readers). Concurrency: tune.max_concurrent_trials, else how many trials fit.
    """
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    cpw = base.scaling.cpus_per_worker
    usable = max(cpw, cpus - settings.reserve_cpus)
    workers = settings.workers_per_trial or base.scaling.num_workers
    if settings.workers_per_trial is None:
        workers = max(1, min(workers, int(usable // cpw)))
    use_gpu = base.scaling.use_gpu if base.scaling.use_gpu is not None else gpus > 0
    # each trial also holds TRIAL_CPU, and Ray Data's 1-CPU read tasks need reserve_cpus left over all the time
    fit = max(1, int((usable + 1e-9) // (workers * cpw + TRIAL_CPU)))
    if use_gpu:
        fit = min(fit, max(1, int(gpus // (workers * base.scaling.gpus_per_worker))))
    concurrent = settings.max_concurrent_trials or fit
    return {"workers_per_trial": workers, "max_concurrent_trials": concurrent, "cpus_per_trial": workers * cpw,
            "use_gpu": bool(use_gpu), "cluster": {"CPU": cpus, "GPU": gpus}}


def train_trial(config: dict[str, Any], base: dict[str, Any], data_dir: str, out_dir: str,
                train_storage: str) -> None:
    """Tune function trainable (`config` = {"trial": drawn values}; the rest bound by tune.with_parameters):
    one TorchTrainer run of the trial's TrainConfig, reporting through Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import build_trainer

    trial_id = tune.get_context().get_trial_id()
    starts = Path(out_dir) / STARTS_DIR
    starts.mkdir(parents=True, exist_ok=True)
    with open(starts / trial_id, "a") as f:
        f.write(f"{time.time():.3f}\n")
    cfg = trial_train_config(base, config["trial"])
    trainer = build_trainer(cfg, data_dir, Path(out_dir) / "trials" / trial_id,
                            name=f"train-{trial_id}", storage_path=train_storage, mlflow=False,
                            callbacks=[TuneReportCallback()])
    result = trainer.fit()  # same name + storage on a resumed trial: Train continues from its last checkpoint
    if result.error is not None:
        raise RuntimeError(f"trial {trial_id}: training failed: {result.error}") from result.error
    returned = result.return_value if isinstance(result.return_value, dict) else {}
    if returned.get("stopped"):  # an error a retry cannot fix (divergence, a config mismatch): the trial fails
        raise RuntimeError(f"trial {trial_id}: training stopped: {returned['stopped']}")


def result_rows(grid: Any, base: TrainConfig, base_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: its drawn values, best-epoch MPJPE, GFLOPs (measured and predicted), epochs run."""
    from h2ot.flops import predicted_linear_flops

    rows = []
    for result in grid:
        trial = result.config["trial"]
        df = result.metrics_dataframe
        history = [] if df is None or "val/mpjpe_mm" not in df else df.to_dict("records")
        metrics = result.metrics or {}
        epochs = max((int(h.get("epoch") or 0) for h in history), default=0)
        best = min(history, key=lambda h: h["val/mpjpe_mm"]) if history else {}
        cfg = trial_train_config(base_dict, trial)
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "schedule": [list(map(int, s)) for s in trial["schedule"]], "stages": len(trial["schedule"]),
            "tpm": trial["tpm"], "trm": trial["trm"], "lr": float(trial["lr"]), "seed": cfg.optim.seed,
            "gflops": _num(best.get("gflops")), "gflops_predicted": predicted_linear_flops(cfg.model) / 1e9,
            "mpjpe_mm": _num(best.get("val/mpjpe_mm")), "p_mpjpe_mm": _num(best.get("val/p_mpjpe_mm")),
            "epochs": epochs, "complete": epochs >= base.optim.epochs,
            "status": "error" if result.error is not None else ("complete" if epochs >= base.optim.epochs
                                                                else "stopped"),
            "history": [{k: _num(h.get(k)) for k in ("epoch", "val/mpjpe_mm", "gflops", "train/loss")}
                        for h in history],
        })
    return sorted(rows, key=lambda r: (r["gflops_predicted"], r["mpjpe_mm"]))


def summarize_search(rows: list[dict[str, Any]], settings: TuneSettings) -> dict[str, Any]:
    """Marks the Pareto rows (`pareto`) and returns the summary: best, cheapest within 1 %, full, HoT, the front,
    the hierarchical schedules that beat HoT, and (with tune.seeds) the per-schedule seed groups."""
    from jobs.tune_search import pareto_front, seed_groups, summarize

    front = {r["trial_id"] for r in pareto_front([r for r in rows if r["complete"]])}
    for r in rows:
        r["pareto"] = r["trial_id"] in front
    summary = summarize(rows, settings.hot_schedule)
    by_id = {r["trial_id"]: r for r in rows}
    summary["rows"] = {k: _brief(by_id[v]) for k, v in summary.items()
                       if k in ("best", "cheapest_within_1pct", "full", "hot") and v}
    summary["pareto_rows"] = [_brief(by_id[t]) for t in summary["pareto"]]
    summary["beats_hot_rows"] = [_brief(by_id[t]) for t in summary["beats_hot"]]
    if settings.seeds:
        summary["seed_groups"] = seed_groups([r for r in rows if r["complete"]])
    return summary


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("trial_id", "schedule", "tpm", "trm", "lr", "seed", "gflops", "mpjpe_mm", "epochs")}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
