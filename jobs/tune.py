"""`h2ot tune --config configs/tune_X.yaml --data SHARDS_DIR --out OUT`: Ray Tune over pruning schedules.

Each trial trains the base train config (`base:` in the tune config) with a drawn schedule, TPM, TRM and lr,
through the same Ray Train loop as `h2ot train` (jobs.train.build_trainer + Tune's TuneReportCallback: a
function trainable that runs a TorchTrainer). Every trial reports `val/mpjpe_mm` and `gflops` per epoch (epochs
capped at `optim.steps_per_epoch` steps); ASHA stops the poor ones early. The trials are drawn before Ray starts
(h2ot.search.sample_trials: valid by construction, the include anchors first) and handed to Tune as a grid, so
an invalid space fails in a second with the field named, and the same seed gives the same trials.

OUT receives: mlflow.db (unless MLFLOW_TRACKING_URI is set), ray/<name>/ (Tune's experiment, restorable) and
ray/<name>-train/ (the trials' Train runs and checkpoints), pareto.csv, pareto.json, pareto.png, summary.json.
MLflow: a parent run per search (the Pareto table, plot and summary) and a child run per trial, all written by
the driver (jobs.tune_mlflow), so concurrent trials never lock one sqlite file.
Rerunning the same command resumes an interrupted search (`Tuner.restore`): finished trials are kept, unfinished
ones continue from their last Train checkpoint. Against a cluster: set RAY_ADDRESS (and run.storage_path of the
base config, or --storage, to a shared path); trial concurrency and workers per trial follow the cluster's size.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from jobs._common import add_output_flags, friendly_errors, require_shards, setup_logging

log = logging.getLogger(__name__)

TRIAL_CPU = 0.01  # the trial function only drives a TorchTrainer; its workers hold the CPUs (ECOSYSTEM.md)
LOCAL_RAY_ATTEMPTS = 3  # a local ray.init on a loaded host can miss Ray's fixed 30 s raylet wait
STARTS_DIR = "trial_starts"  # one file per trial id, a line per (re)start: what the resume test checks
TABLE_FIELDS = ("trial_id", "schedule", "stages", "tpm", "trm", "lr", "seed", "gflops", "gflops_predicted", "mpjpe_mm",
                "p_mpjpe_mm", "epochs", "complete", "pareto", "status")


# --------------------------------------------------------------------------------------------- plan (no Ray)
def load_search(config: str | Path, overrides: list[str] | None = None) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(TuneConfig, base TrainConfig, trials): everything checked before Ray starts."""
    from h2ot.config import load_config
    from h2ot.search import sample_trials

    tcfg = load_config(config, overrides, kind="tune")
    base = tcfg.base_config()
    trials = sample_trials(tcfg.space, base.model, tcfg.tune, base.optim.lr)
    return tcfg, base, trials


def search_name(tcfg: Any, config: str | Path) -> str:
    return tcfg.name or Path(config).stem


def trial_train_config(base: dict[str, Any], trial: dict[str, Any]) -> Any:
    """The TrainConfig one trial trains: the base with the drawn schedule, strategies and lr."""
    from h2ot.config import config_from_dict

    cfg = config_from_dict(base, "train")
    cfg.model.schedule = [list(s) for s in trial["schedule"]]
    cfg.model.tpm, cfg.model.trm, cfg.optim.lr = trial["tpm"], trial["trm"], float(trial["lr"])
    if trial.get("seed") is not None:
        cfg.optim.seed = int(trial["seed"])
    return cfg


def plan_resources(base: Any, settings: Any, cluster: dict[str, float]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------- the trial
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


# --------------------------------------------------------------------------------------------- the search
def _ensure_ray(num_cpus: int | None) -> None:
    from cluster.ray_session import connect
    from jobs.train import WORKER_ENV

    # the dashboard must run too (Train's placement-group cleaner asks it), hence no dashboard=False
    connect(num_cpus=num_cpus, env_vars=WORKER_ENV, log_to_driver=False, start_attempts=LOCAL_RAY_ATTEMPTS,
            pin_gcs_address=True)


def run_search(config: str | Path, data_dir: str | Path, out_dir: str | Path, *, overrides: list[str] | None = None,
               storage: str | None = None, num_cpus: int | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the search; -> the summary (also OUT/summary.json)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from h2ot.config import to_dict
    from jobs.tracking import create_run, tracking_uri
    from jobs.train import check_shards, default_storage_path
    from jobs.tune_mlflow import ChildRuns, MlflowTrialLogger

    tcfg, base, trials = load_search(config, overrides)
    check_shards(base, data_dir)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = search_name(tcfg, config)
    storage = storage or default_storage_path(base, out_dir)
    exp_path = f"{storage.rstrip('/')}/{name}"
    _ensure_ray(num_cpus)
    plan = plan_resources(base, tcfg.tune, ray.cluster_resources())
    base.scaling.num_workers = plan["workers_per_trial"]
    base_dict = to_dict(base)
    log.info("search %s: %d trials, %d at a time, %d worker(s) x %.2f CPU per trial, cluster %s",
             name, len(trials), plan["max_concurrent_trials"], plan["workers_per_trial"],
             base.scaling.cpus_per_worker, plan["cluster"])

    uri = tracking_uri(out_dir)
    experiment = tcfg.experiment or base.run.experiment
    parent = create_run(uri, experiment, f"tune-{name}", out_dir,
                        {"search": name, "data": Path(data_dir).name, "backbone": base.model.backbone})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.get_run(parent).info.experiment_id
    client.log_batch(parent, params=_params_once(client, parent, {
        "config": str(config), "base": tcfg.base, "num_samples": len(trials), "scheduler": tcfg.tune.scheduler,
        "max_concurrent_trials": plan["max_concurrent_trials"], "workers_per_trial": plan["workers_per_trial"],
        "epochs": base.optim.epochs, "steps_per_epoch": base.optim.steps_per_epoch}))
    client.log_dict(parent, {"trials": trials, "plan": plan, "tune": to_dict(tcfg)}, "search.json")
    runs = ChildRuns(uri, exp_id, parent, out_dir)

    bound = tune.with_parameters(train_trial, base=base_dict, data_dir=str(Path(data_dir).resolve()),
                                 out_dir=str(out_dir), train_storage=f"{storage.rstrip('/')}/{name}-train")
    trainable = tune.with_resources(bound, {"cpu": TRIAL_CPU})
    if not fresh and tune.Tuner.can_restore(exp_path):
        log.info("resuming the search in %s (finished trials are kept)", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # ASHA counts the loop's `epoch`, not Tune's training_iteration: a trial restarted by a resume continues its
        # Train run at its last epoch, while its iteration count starts again from 1
        scheduler = FIFOScheduler() if tcfg.tune.scheduler == "none" else ASHAScheduler(
            time_attr="epoch", max_t=base.optim.epochs, grace_period=tcfg.tune.grace_period,
            reduction_factor=tcfg.tune.reduction_factor)
        param_space = {"trial": tune.grid_search(trials)}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=tcfg.tune.metric, mode=tcfg.tune.mode, scheduler=scheduler,
                                        num_samples=1, max_concurrent_trials=plan["max_concurrent_trials"]),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      callbacks=[MlflowTrialLogger(runs, base_dict)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    rows = result_rows(grid, base, base_dict)
    summary = finish_search(rows, tcfg, base, out_dir, client, parent, runs, base_dict, name)
    client.set_terminated(parent, "FINISHED")
    return summary


def _params_once(client: Any, run_id: str, params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    return [Param(k, str(v)) for k, v in params.items() if k not in existing]


def result_rows(grid: Any, base: Any, base_dict: dict[str, Any]) -> list[dict[str, Any]]:
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


def _num(v: Any) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def finish_search(rows: list[dict[str, Any]], tcfg: Any, base: Any, out_dir: Path, client: Any, parent: str,
                  runs: Any, base_dict: dict[str, Any], name: str) -> dict[str, Any]:
    """Pareto table (CSV, JSON), plot and summary into OUT and onto the parent run; child runs reconciled."""
    from h2ot.search import pareto_front, seed_groups, summarize

    front = {r["trial_id"] for r in pareto_front([r for r in rows if r["complete"]])}
    for r in rows:
        r["pareto"] = r["trial_id"] in front
    summary = summarize(rows, tcfg.tune.hot_schedule)
    by_id = {r["trial_id"]: r for r in rows}
    summary["rows"] = {k: _brief(by_id[v]) for k, v in summary.items()
                       if k in ("best", "cheapest_within_1pct", "full", "hot") and v}
    summary["pareto_rows"] = [_brief(by_id[t]) for t in summary["pareto"]]
    summary["beats_hot_rows"] = [_brief(by_id[t]) for t in summary["beats_hot"]]
    if tcfg.tune.seeds:
        summary["seed_groups"] = seed_groups([r for r in rows if r["complete"]])

    _reconcile_children(rows, runs, base_dict)
    with open(out_dir / "pareto.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "schedule": json.dumps(r["schedule"])})
    (out_dir / "pareto.json").write_text(json.dumps({"trials": rows, "summary": summary}, indent=1))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "pareto.md").write_text(table_markdown(rows))
    fig = pareto_figure(rows, tcfg.tune.hot_schedule, f"{name}: {base.model.backbone} "
                        f"d{base.model.dim}x{base.model.depth} f{base.model.frames}")
    fig.savefig(out_dir / "pareto.png", dpi=120, bbox_inches="tight")
    client.log_artifact(parent, str(out_dir / "pareto.csv"))
    client.log_artifact(parent, str(out_dir / "pareto.json"))
    client.log_artifact(parent, str(out_dir / "pareto.png"))
    client.log_dict(parent, summary, "summary.json")
    best = summary["rows"].get("best")
    if best:
        client.log_batch(parent, metrics=_metrics({"best/mpjpe_mm": best["mpjpe_mm"], "best/gflops": best["gflops"],
                                                   "pareto_size": len(front), "trials": len(rows)}))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return summary


def _metrics(values: dict[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items() if math.isfinite(float(v))]


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("trial_id", "schedule", "tpm", "trm", "lr", "seed", "gflops", "mpjpe_mm", "epochs")}


def _reconcile_children(rows: list[dict[str, Any]], runs: Any, base_dict: dict[str, Any]) -> None:
    """Every trial has a child run with its per-epoch metrics and final figures, even one the live callback
    missed (e.g. it finished just before the driver was killed)."""
    for r in rows:
        run_id = runs.get_or_create(r["trial_id"], {k: r[k] for k in ("schedule", "tpm", "trm", "lr", "seed")},
                                    base_dict)
        if not runs.client.get_metric_history(run_id, "val/mpjpe_mm"):
            for h in r["history"]:
                runs.log_epoch(run_id, h, int(h["epoch"]))
        final = {"final/mpjpe_mm": r["mpjpe_mm"], "final/gflops": r["gflops"],
                 "final/gflops_predicted": r["gflops_predicted"], "final/epochs": r["epochs"]}
        runs.client.log_batch(run_id, metrics=_metrics(final))
        runs.client.set_tag(run_id, "status", r["status"])
        runs.client.set_tag(run_id, "pareto", str(r["pareto"]))
        if runs.client.get_run(run_id).info.status == "RUNNING":
            runs.client.set_terminated(run_id, "FAILED" if r["status"] == "error" else "FINISHED")


def pareto_figure(rows: list[dict[str, Any]], hot_schedule: list[list[int]], title: str) -> Any:
    """GFLOPs (x) vs MPJPE (y): every trial, the Pareto front, the full model and the HoT point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.tracking import schedule_tag

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["complete"] and math.isfinite(r["mpjpe_mm"])]
    stopped = [r for r in rows if not r["complete"] and math.isfinite(r["mpjpe_mm"])]
    ax.scatter([r["gflops"] for r in done], [r["mpjpe_mm"] for r in done], c="tab:gray", s=22,
               label="trial (all epochs)")
    if stopped:
        ax.scatter([r["gflops"] for r in stopped], [r["mpjpe_mm"] for r in stopped], marker="x", c="silver", s=18,
                   label="stopped early (ASHA)")
    front = [r for r in done if r["pareto"]]
    front.sort(key=lambda r: r["gflops"])
    ax.plot([r["gflops"] for r in front], [r["mpjpe_mm"] for r in front], "-o", c="tab:red", ms=5,
            label="Pareto front")
    for r in front:
        ax.annotate(schedule_tag(r["schedule"]), (r["gflops"], r["mpjpe_mm"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    from h2ot.search import find_schedule

    for schedule, marker, color, label in (([], "s", "black", "full model"), (hot_schedule, "*", "tab:blue",
                                                                              "HoT (1 stage)")):
        r = find_schedule(rows, schedule) if (schedule or label == "full model") else None
        if r is not None:
            ax.scatter([r["gflops"]], [r["mpjpe_mm"]], marker=marker, s=140, facecolors="none", edgecolors=color,
                       linewidths=1.8, label=f"{label}: {schedule_tag(r['schedule'])}"
                       + ("" if r["complete"] else " (stopped early)"), zorder=5)
    ax.set_xlabel("GFLOPs per clip (Linear layers, 2 x MACs)")
    ax.set_ylabel("MPJPE (mm, best epoch)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The trial table as Markdown (OUT/pareto.md; docs), cheapest first; Pareto rows in bold."""
    from jobs.tracking import schedule_tag

    lines = ["| trial | schedule | TPM | TRM | lr | seed | GFLOPs | MPJPE mm | P-MPJPE mm | epochs | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["gflops"], r["mpjpe_mm"])):
        cells = [r["trial_id"], f"`{schedule_tag(r['schedule'])}`", r["tpm"], r["trm"], f"{r['lr']:g}", str(r["seed"]),
                 f"{r['gflops']:.4f}", f"{r['mpjpe_mm']:.1f}", f"{r['p_mpjpe_mm']:.1f}", str(r["epochs"]),
                 r["status"] + (", **Pareto**" if r["pareto"] else "")]
        if r["pareto"]:
            cells[7] = f"**{cells[7]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_summary(summary: dict[str, Any]) -> str:
    def line(r: dict[str, Any]) -> str:
        from jobs.tracking import schedule_tag

        return (f"{r['trial_id']}  {schedule_tag(r['schedule']):<16} {r['tpm']:<9} {r['trm']:<15} lr {r['lr']:<8g}"
                f" {r['gflops']:.4f} GFLOPs  {r['mpjpe_mm']:.2f} mm  ({r['epochs']} epochs)")

    out = [f"{summary['trials']} trials, {summary['complete']} ran every epoch; Pareto front (GFLOPs up, MPJPE down):"]
    out += ["  " + line(r) for r in summary["pareto_rows"]]
    rows = summary["rows"]
    for key, text in (("best", "best MPJPE"), ("cheapest_within_1pct", "cheapest within 1 % of the best"),
                      ("full", "full model"), ("hot", "HoT one stage")):
        if key in rows:
            out.append(f"{text}: {line(rows[key])}")
    if "hot" in rows:
        out.append("hierarchical schedules beating HoT at <= its FLOPs: "
                   + (", ".join(line(r) for r in summary["beats_hot_rows"]) or "none"))
    for g in summary.get("seed_groups", []):
        from jobs.tracking import schedule_tag

        out.append(f"seeds {g['seeds']}: {schedule_tag(g['schedule']):<16} {g['tpm']:<9} {g['trm']:<15} "
                   f"{g['gflops']:.4f} GFLOPs  {g['mpjpe_mm_mean']:.2f} +- {g['mpjpe_mm_std']:.2f} mm")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="h2ot tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/tune_*.yaml (kind: tune)")
    p.add_argument("--data", required=True, help="shard folder of `h2ot preprocess` (manifest.json, train/, test/)")
    p.add_argument("--out", required=True, help="search folder: mlflow.db, ray/, pareto.{csv,json,png}, summary.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a tune config value, e.g. --set tune.num_samples=8 (repeatable)")
    p.add_argument("--storage", help="Tune/Train storage (shared path on a cluster); default: the base config's "
                   "run.storage_path, else OUT/ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--fresh", action="store_true", help="start over even if OUT holds an interrupted search")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the trials; no Ray")
    add_output_flags(p, "print the summary as one JSON object")
    return p.parse_args(argv)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from jobs.train import apply_worker_env

    apply_worker_env()
    if args.dry_run:
        _, _, trials = load_search(args.config, args.overrides)
        print(json.dumps(trials, indent=1))
        return 0
    require_shards(args.data)
    summary = run_search(args.config, args.data, args.out, overrides=args.overrides, storage=args.storage,
                         num_cpus=args.num_cpus, fresh=args.fresh)
    print(json.dumps(summary, default=str) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
