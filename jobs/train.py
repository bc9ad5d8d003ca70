"""`h2ot train --config configs/X.yaml --data SHARDS_DIR --out RUN_DIR [--set key=value ...]`: Ray Train DDP.

YAML -> `TrainConfig` (+ dotted overrides that mirror the YAML, `--set optim.epochs=2`) -> plain dict to Ray.
The same command runs on a laptop (local `ray.init()`), against a running cluster (`RAY_ADDRESS`, or
`ray job submit --working-dir . -- python -m jobs.train ...`), and on GPUs when the cluster can have them
(scaling.use_gpu, else the autoscaler's declared GPU capacity: `resolve_use_gpu`).

Runs are named by what they train plus a hash of the config and the shards (`resolve_name`); a run restarted
under the same name resumes from its last checkpoint, and one whose checkpoint belongs to another config or other
shards stops at once with one line (`TrainingStopped`), as a diverged run does. Each epoch prints one line on
the driver (jobs.progress).

Public API (used by Ray Tune trials and the demo):
    build_trainer(cfg, data_dir, out_dir, ...) -> TorchTrainer
    run_training(cfg, data_dir, out_dir, ...) -> {"metrics", "best", "model_path", "checkpoint_path", ...}
RUN_DIR receives: model.pt (the best epoch, h2ot checkpoint format with the manifest hash and git revision),
result.json, mlflow.db (unless MLFLOW_TRACKING_URI is set), ray/ (checkpoints, unless run.storage_path is set).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from cluster.ray_session import connect
from jobs._common import UserError, add_output_flags, friendly_errors, require_shards, setup_logging, shard_manifest
from jobs.settings import TrainConfig, load_train_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
RESULT_FILE = "result.json"
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # Ray Train's print patch would show each worker print twice


def apply_worker_env() -> None:
    """WORKER_ENV into this process's environment (a local Ray passes it on), values already set win."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)


def _is_uri(path: str) -> bool:
    return "://" in path


def default_storage_path(cfg: TrainConfig, out_dir: str | Path) -> str:
    """run.storage_path (local folder, NFS or s3://), else RUN_DIR/ray."""
    sp = cfg.run.storage_path
    if sp:
        return sp if _is_uri(sp) else str(Path(sp).resolve())
    return str((Path(out_dir) / "ray").resolve())


def check_shards(cfg: TrainConfig, data_dir: str | Path) -> dict[str, Any]:
    """The shard manifest, after checking it fits the model (window length). Raises UserError otherwise."""
    from jobs.evaluation import ShardMismatch, check_frames
    from pipelines.shards import split_files

    manifest = shard_manifest(data_dir)
    try:
        check_frames(int(manifest["frames"]), cfg.model.frames, str(data_dir))
    except ShardMismatch as e:
        raise UserError(str(e)) from None
    for split in ("train", "test"):
        if not split_files(data_dir, split):
            raise UserError(f"{data_dir}: no {split} shards ({data_dir}/{split}/*.parquet)")
    return manifest


HASHED_SECTIONS = ("model", "optim", "loss")  # what decides the trained weights (not scaling, not run settings)


def config_hash(cfg: TrainConfig) -> str:
    """sha256 of the config sections that decide what is trained (HASHED_SECTIONS), key order independent."""
    from h2ot.config import to_dict

    d = to_dict(cfg)
    return hashlib.sha256(json.dumps({k: d[k] for k in HASHED_SECTIONS}, sort_keys=True).encode()).hexdigest()


def run_hash(cfg: TrainConfig, data_dir: str | Path) -> str:
    """8 hex digits of config + shards: the default run name's suffix, so another config never resumes."""
    from pipelines.shards import manifest_hash

    return hashlib.sha256(f"{config_hash(cfg)}:{manifest_hash(data_dir)}".encode()).hexdigest()[:8]


def loop_config(cfg: TrainConfig, data_dir: str | Path, *, mlflow: dict[str, str] | None = None,
                fail_at_step: int | None = None, gflops: dict[str, float] | None = None) -> dict[str, Any]:
    """The plain dict the train loop receives (see jobs.train_loop). The FLOPs are counted here, once, unless
    given: not on rank 0 while the other ranks wait for it."""
    from h2ot.config import to_dict
    from h2ot.flops import model_gflops
    from h2ot.models import build_model
    from jobs.tracking import git_revision
    from pipelines.shards import manifest_hash

    return {
        "cfg": to_dict(cfg),
        "data_dir": str(Path(data_dir).resolve()),
        "manifest_hash": manifest_hash(data_dir),
        "config_hash": config_hash(cfg),
        "gflops": gflops if gflops is not None else model_gflops(build_model(cfg.model), cfg.model),
        "git_rev": git_revision(),
        "mlflow": mlflow,
        "fail_at_step": fail_at_step,
    }


def cluster_gpu_capacity() -> float:
    """GPUs the connected Ray cluster can have: the autoscaler's declared maximum (node groups x max replicas),
    else (no autoscaler: a fixed cluster) the GPUs it has. 0 when Ray is not connected."""
    import ray

    if not ray.is_initialized():
        return 0.0
    from ray._private.state import state  # what Ray Train itself reads to size a worker group

    declared = state.get_max_resources_from_cluster_config()
    if declared:
        return float(declared.get("GPU", 0))
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """scaling.use_gpu when set; None: whether the cluster can have GPUs (`cluster_gpu_capacity`), so an
    autoscaling GPU group that starts at 0 replicas still trains on GPUs."""
    if use_gpu is not None:
        return bool(use_gpu)
    return cluster_gpu_capacity() > 0


class TrainingStopped(UserError):
    """The run ended on an error a retry cannot fix (the train loop's message)."""


def setup_mlflow(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, name: str,
                 parent_run_id: str | None = None) -> dict[str, str]:
    """Create (or reuse, for a rerun into the same RUN_DIR) the MLflow run rank 0 will log into."""
    from jobs.tracking import create_run, schedule_tag, tracking_uri

    uri = tracking_uri(out_dir)
    tags = {"backbone": cfg.model.backbone, "schedule": schedule_tag(cfg.model.schedule),
            "data": Path(data_dir).name, "frames": str(cfg.model.frames)}
    run_id = create_run(uri, cfg.run.experiment, name, out_dir, tags, parent_run_id)
    return {"uri": uri, "run_id": run_id}


# Blocks of the shuffled training set. An epoch capped by optim.steps_per_epoch reads a prefix of the blocks in
# that epoch's order, so the blocks are the grain of its sample of windows (Ray's shuffle makes one block per read
# task: 1-4 blocks for the shards of docs/RESULTS.md).
SHUFFLED_BLOCKS = 128


def train_dataset(data_dir: str | Path, materialize: bool = True, seed: int | None = None) -> Any:
    """The training windows as a Ray Dataset of tensor columns only (strings break iter_torch_batches).

    Shards hold each sequence's windows in order, so reading them as written makes batches of near-identical
    consecutive windows. Materialized, the windows are shuffled globally once and kept in the object store
    (decoding Parquet every epoch made the workers wait for data more than half of the time on 2 cores); every
    epoch then visits the blocks in a new order, and the loop adds a local shuffle buffer. Set materialize=False
    for data larger than the object store (file order and the local buffer only).

    With a seed, every run of that seed sees the same windows in the same order (and every epoch another order):
    the files are read in name order, the shuffle's input keeps that order whatever order Ray's tasks finish in,
    and the block order of epoch e is drawn from (seed, e). With seed None each run draws its own.
    """
    import ray
    from ray.data import DataContext, FileShuffleConfig, RandomSeedConfig

    from jobs.train_loop import TRAIN_COLUMNS

    files = sorted(str(p) for p in (Path(data_dir).resolve() / "train").glob("*.parquet"))
    context = DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = seed is not None
    try:
        ds = ray.data.read_parquet(files, shuffle=FileShuffleConfig(seed=seed) if seed is not None else "files")
        ds = ds.select_columns(TRAIN_COLUMNS)
        if materialize:
            ds = ds.random_shuffle(seed=seed).repartition(SHUFFLED_BLOCKS).materialize()
    finally:
        context.execution_options.preserve_order = preserve_order
    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def ingest_config(seed: int | None) -> Any:
    """Ray Train's DataConfig: with a seed the blocks reach the workers in the dataset's order, so which worker
    trains on which windows does not depend on timing (Ray's split hands each block to the worker that has
    the fewest rows so far, deterministic once the order is)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or seed is not None
    return DataConfig(execution_options=options)


def resolve_name(cfg: TrainConfig, data_dir: str | Path, name: str | None = None) -> str:
    """The run's name: explicit, else run.name, else what was trained (jobs.tracking.run_name) and a hash of the
    whole config and the shards (`run_hash`): a changed lr or other shards start a new run, never resume one."""
    from h2ot.config import to_dict
    from jobs.tracking import run_name

    return name or cfg.run.name or f"{run_name(to_dict(cfg), data_dir)}-{run_hash(cfg, data_dir)}"


def build_trainer(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    storage_path: str | None = None,
    mlflow: bool | dict[str, str] = True,
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    fail_at_step: int | None = None,
    gflops: dict[str, float] | None = None,
) -> Any:
    """A TorchTrainer for `cfg` on the shards of `data_dir`; checkpoints under storage_path/name.

    mlflow: True (create a run, see jobs.tracking), False (no tracking), or {uri, run_id} of an existing run.
    callbacks: Ray Train UserCallbacks (e.g. Tune's TuneReportCallback). Connects to Ray if needed.
    On GPUs the process group is "cpu:gloo,cuda:nccl": NCCL for CUDA tensors (DDP), gloo for CPU objects.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_loop import train_loop_per_worker

    check_shards(cfg, data_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    connect(env_vars=WORKER_ENV)  # RAY_ADDRESS, else a fresh local instance
    name = resolve_name(cfg, data_dir, name)
    tracking = None
    if mlflow is True:
        tracking = setup_mlflow(cfg, data_dir, out_dir, name, parent_run_id)
    elif isinstance(mlflow, dict):
        tracking = dict(mlflow)
    use_gpu = resolve_use_gpu(cfg.scaling.use_gpu)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    env = dict(WORKER_ENV)
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking["uri"]
    train_ds = train_dataset(data_dir, seed=cfg.optim.seed)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, data_dir, mlflow=tracking, fail_at_step=fail_at_step, gflops=gflops),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl") if use_gpu else None,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path or default_storage_path(cfg, out_dir),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         controller_failure_limit=cfg.run.max_startup_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep,
                                               checkpoint_score_attribute="val/mpjpe_mm",
                                               checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
        ),
        datasets={"train": train_ds},
        dataset_config=ingest_config(cfg.optim.seed),
    )


def export_best_model(result: Any, out_dir: str | Path) -> Path | None:
    """Copy the best model (carried by the latest checkpoint) to RUN_DIR/model.pt."""
    from jobs.train_loop import BEST_MODEL_FILE

    checkpoint = result.checkpoint
    if checkpoint is None:
        return None
    target = Path(out_dir) / MODEL_FILE
    with checkpoint.as_directory() as d:
        source = Path(d) / BEST_MODEL_FILE
        if not source.is_file():
            return None
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy(source, tmp)
        tmp.replace(target)
    return target


def run_training(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True,
                 **trainer_kwargs: Any) -> dict[str, Any]:
    """Train (or resume) and export: -> {metrics (last checkpoint's), best, model_path, checkpoint_path,
    run_path, mlflow}. progress: each epoch's line on stderr (EpochProgress). Raises RuntimeError when the run
    failed after its retries, TrainingStopped when it ended on an error a retry cannot fix."""
    import torch

    check_shards(cfg, data_dir)  # before Ray starts: a mismatch is one line, not a failed run
    if trainer_kwargs.get("mlflow", True) is True:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        name = resolve_name(cfg, data_dir, trainer_kwargs.get("name"))
        trainer_kwargs["mlflow"] = setup_mlflow(cfg, data_dir, out_dir, name, trainer_kwargs.pop("parent_run_id", None))
    watcher = None
    if progress:

        connect(env_vars=WORKER_ENV)
        from jobs.progress import EpochProgress

        watcher = EpochProgress(cfg.optim.epochs)
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), watcher.callback()]
    trainer = build_trainer(cfg, data_dir, out_dir, **trainer_kwargs)
    result = watcher.fit(trainer) if watcher is not None else trainer.fit()
    stopped = (result.return_value or {}).get("stopped") if isinstance(result.return_value, dict) else None
    tracking = trainer_kwargs.get("mlflow")
    if isinstance(tracking, dict):  # the driver created the run, so the driver ends it (rank 0 only logs)
        from jobs.tracking import end_run

        end_run(tracking, failed=result.error is not None or stopped is not None)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if stopped:
        raise TrainingStopped(f"training stopped: {stopped}")
    model_path = export_best_model(result, out_dir)
    best = None
    if model_path is not None:
        best = torch.load(model_path, map_location="cpu", weights_only=True)["meta"].get("metrics")
    summary = {
        "metrics": result.metrics,
        "best": best,
        "model_path": str(model_path) if model_path else None,
        "checkpoint_path": result.checkpoint.path if result.checkpoint is not None else None,
        "run_path": result.path,
        "mlflow": trainer_kwargs.get("mlflow") or None,
        "return_value": getattr(result, "return_value", None),
    }
    Path(out_dir, RESULT_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="h2ot train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/*.yaml (kind: train)")
    p.add_argument("--data", required=True, help="shard folder of `h2ot preprocess` (manifest.json, train/, test/)")
    p.add_argument("--out", required=True, help="run folder: model.pt, result.json, mlflow.db, ray/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with dotted keys, e.g. --set optim.epochs=2 (repeatable)")
    p.add_argument("--no-mlflow", action="store_true", help="do not track the run in MLflow")
    add_output_flags(p, "print the result summary as one JSON object")
    return p.parse_args(argv)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    apply_worker_env()
    cfg = load_train_config(args.config, args.overrides)
    require_shards(args.data)
    summary = run_training(cfg, args.data, args.out, mlflow=not args.no_mlflow)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        best = summary["best"] or {}
        print(f"best epoch {best.get('epoch')}: val/mpjpe_mm {best.get('val/mpjpe_mm', float('nan')):.2f}  "
              f"-> {summary['model_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
