"""`h2ot tune --config configs/tune_X.yaml --data SHARDS_DIR --out OUT`: Ray Tune over pruning schedules.

Each trial trains the base train config (`base:` in the tune config) with a drawn schedule, TPM, TRM and lr,
through the same Ray Train loop as `h2ot train` (jobs.tune_trials). Every trial reports `val/mpjpe_mm` and
`gflops` per epoch (epochs capped at `optim.steps_per_epoch` steps); ASHA stops the poor ones early. As each
trial ends, a line says how many trials have ended out of how many, and which is the best so far.

OUT receives: mlflow.db (unless MLFLOW_TRACKING_URI is set), ray/<name>/ (Tune's experiment, restorable) and
ray/<name>-train/ (the trials' Train runs and checkpoints), pareto.csv, pareto.json, pareto.md, pareto.png,
summary.json (jobs.report). MLflow: a parent run per search (the Pareto table, plot and summary) and a child run
per trial, all written by the driver (jobs.tracking.search.SearchRun), so concurrent trials never lock one sqlite file.
Rerunning the same command resumes an interrupted search (`Tuner.restore`): finished trials are kept, unfinished
ones continue from their last Train checkpoint. Against a cluster: set RAY_ADDRESS (and run.storage_path of the
base config, or --storage, to a shared path); trial concurrency and workers per trial follow the cluster's size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jobs._common import add_output_flags, friendly_errors, require_shards, setup_logging
from jobs.settings import TrainConfig
from jobs.train import cluster_gpu_capacity
from jobs.tune_search import TuneConfig
from jobs.tune_trials import TRIAL_CPU, load_search, plan_resources, search_name

log = logging.getLogger(__name__)

LOCAL_RAY_ATTEMPTS = 3  # a local Ray start on a loaded host can miss Ray's fixed 30 s raylet wait


def run_search(config: str | Path, data_dir: str | Path, out_dir: str | Path, *, overrides: list[str] | None = None,
               storage: str | None = None, num_cpus: int | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the search; -> the summary (also OUT/summary.json)."""
    import ray

    from cluster.ray_session import connect
    from h2ot.config import to_dict
    from jobs.report import write_search_report
    from jobs.tracking import tracking_uri
    from jobs.tracking.search import SearchRun
    from jobs.train import WORKER_ENV, check_shards, default_storage_path
    from jobs.tune_trials import result_rows, summarize_search

    tcfg, base, trials = load_search(config, overrides)
    check_shards(base, data_dir)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = search_name(tcfg, config)
    storage = (storage or default_storage_path(base, out_dir)).rstrip("/")
    # the dashboard runs too (no dashboard=False): Train's placement-group cleaner asks it
    connect(num_cpus=num_cpus, env_vars=WORKER_ENV, log_to_driver=False, start_attempts=LOCAL_RAY_ATTEMPTS,
            pin_gcs_address=True)
    # GPUs: what the cluster can have (an autoscaling GPU group may have 0 nodes now), not a momentary count
    plan = plan_resources(base, tcfg.tune, {**ray.cluster_resources(), "GPU": cluster_gpu_capacity()})
    base.scaling.num_workers = plan["workers_per_trial"]
    base_dict = to_dict(base)
    log.info("search %s: %d trials, %d at a time, %d worker(s) x %.2f CPU per trial, cluster %s",
             name, len(trials), plan["max_concurrent_trials"], plan["workers_per_trial"],
             base.scaling.cpus_per_worker, plan["cluster"])

    run = SearchRun(tracking_uri(out_dir), tcfg.experiment or base.run.experiment, f"tune-{name}", out_dir,
                    {"search": name, "data": Path(data_dir).name, "backbone": base.model.backbone})
    run.log_plan({"config": str(config), "base": tcfg.base, "num_samples": len(trials),
                  "scheduler": tcfg.tune.scheduler, "max_concurrent_trials": plan["max_concurrent_trials"],
                  "workers_per_trial": plan["workers_per_trial"], "epochs": base.optim.epochs,
                  "steps_per_epoch": base.optim.steps_per_epoch},
                 {"trials": trials, "plan": plan, "tune": to_dict(tcfg)})
    tuner = make_tuner(tcfg, base, base_dict, trials, plan, run, data_dir=data_dir, out_dir=out_dir,
                       storage=storage, name=name, fresh=fresh)
    rows = result_rows(tuner.fit(), base, base_dict)
    summary = summarize_search(rows, tcfg.tune)
    run.children.reconcile(rows, base_dict)
    title = f"{name}: {base.model.backbone} d{base.model.dim}x{base.model.depth} f{base.model.frames}"
    files = write_search_report(rows, summary, out_dir, title, tcfg.tune.hot_schedule)
    best = summary["rows"].get("best")
    run.log_report(files, summary, {"best/mpjpe_mm": best["mpjpe_mm"], "best/gflops": best["gflops"],
                                    "pareto_size": len(summary["pareto"]), "trials": len(rows)} if best else {})
    run.finish()
    return summary


def make_tuner(tcfg: TuneConfig, base: TrainConfig, base_dict: dict[str, Any], trials: list[dict[str, Any]],
               plan: dict[str, Any], run: Any, *, data_dir: str | Path, out_dir: Path, storage: str, name: str,
               fresh: bool) -> Any:
    """A new Tuner over the trials (as a grid), or the restored one of an interrupted search in storage/name."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from jobs.tune_callbacks import MlflowTrialLogger, TrialProgress
    from jobs.tune_trials import train_trial

    bound = tune.with_parameters(train_trial, base=base_dict, data_dir=str(Path(data_dir).resolve()),
                                 out_dir=str(out_dir), train_storage=f"{storage}/{name}-train")
    trainable = tune.with_resources(bound, {"cpu": TRIAL_CPU})
    exp_path = f"{storage}/{name}"
    if not fresh and tune.Tuner.can_restore(exp_path):
        log.info("resuming the search in %s (finished trials are kept)", exp_path)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    # ASHA counts the loop's `epoch`, not Tune's training_iteration: a trial restarted by a resume continues its
    # Train run at its last epoch, while its iteration count starts again from 1
    scheduler = FIFOScheduler() if tcfg.tune.scheduler == "none" else ASHAScheduler(
        time_attr="epoch", max_t=base.optim.epochs, grace_period=tcfg.tune.grace_period,
        reduction_factor=tcfg.tune.reduction_factor)
    return tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(metric=tcfg.tune.metric, mode=tcfg.tune.mode, scheduler=scheduler,
                                    num_samples=1, max_concurrent_trials=plan["max_concurrent_trials"]),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                  callbacks=[MlflowTrialLogger(run.children, base_dict),
                                             TrialProgress(len(trials), tcfg.tune.metric)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


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
    from jobs.report import format_summary
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
