"""The one train-loop function every Ray Train run uses (`h2ot train`, Ray Tune trials, the demo).

It touches Ray only through `ray.train` (`get_context`, `get_dataset_shard`, `report`, `get_checkpoint`) and
`ray.train.torch` (device, DDP wrapping). Per epoch: at most `optim.steps_per_epoch` steps of AdamW on the paper's
weighted loss (flip augmentation, gradient clipping, AMP on GPU), exponential lr decay, evaluation on the test
split (shared over the ranks), then `ray.train.report(metrics, checkpoint)` with the full training state. A
restart (failure, or the same run name again) resumes from `get_checkpoint()` and skips finished epochs, after
checking that the checkpoint was written for the same config and shards (their hashes are in each checkpoint).

The step itself is `h2ot.engine.train_step`, the evaluation `h2ot.engine.eval_batch` (via jobs.evaluation).
Errors a retry cannot fix (another run's checkpoint, a bad config, divergence) end the loop with
{"stopped": message} instead of an exception, so FailureConfig does not retry them; the driver reports them.

`config` (plain dict, see `jobs.train.loop_config`): cfg (TrainConfig as a dict), data_dir, manifest_hash,
config_hash, gflops (counted once by the driver), git_rev, mlflow {uri, run_id} or None, fail_at_step (fault
injection for tests: raise at that global step, only while no checkpoint was restored).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from h2ot.config import ConfigError, ModelConfig
from h2ot.engine import ShardMismatch, StepSettings, eval_batch, train_step
from jobs.lr_schedules import build_lr_scheduler
from jobs.settings import TrainConfig, train_config_from_dict

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # model + optimizer + scheduler + scaler + epoch + best, for resuming
BEST_MODEL_FILE = "best_model.pt"  # the best epoch so far, in h2ot's self-describing checkpoint format
METRICS_FILE = "metrics.json"
TRAIN_COLUMNS = ["pose_2d", "conf_2d", "pose_3d", "valid"]  # tensors only: strings break iter_torch_batches
SHUFFLE_BUFFER_BATCHES = 8  # local shuffle buffer, in batches
PREFETCH_BATCHES = 4


class InjectedFailure(RuntimeError):
    """Raised by the fault-injection hook of the tests."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunStopped(RuntimeError):
    """An error a retry cannot fix (another run's checkpoint, divergence): the loop returns {"stopped": message}
    instead of raising, so Ray Train's FailureConfig does not restart it; the driver turns it into one line."""


class ConfigMismatch(RunStopped):
    """The checkpoint to resume belongs to another config or other shards."""


class Diverged(RunStopped):
    """The training loss or the validation error is no longer finite."""


NON_RETRYABLE = (RunStopped, ConfigError, ShardMismatch)


def step_settings(cfg: TrainConfig, device: torch.device) -> StepSettings:
    """The engine's step settings of a TrainConfig; AMP only on CUDA."""
    return StepSettings(in_channels=cfg.model.in_channels, tc_weight=cfg.loss.tc_weight,
                        velocity_weight=cfg.loss.velocity_weight, grad_clip=cfg.optim.grad_clip,
                        flip_augment=cfg.optim.flip_augment, amp=bool(cfg.optim.amp) and device.type == "cuda")


@dataclass
class Worker:
    """Everything one rank trains with, and where it stands (epoch is the next epoch to train)."""

    config: dict[str, Any]
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule_per_step: bool
    scaler: torch.amp.GradScaler
    settings: StepSettings
    gen: torch.Generator
    best_dir: Path
    epoch: int = 0
    global_step: int = 0
    elapsed: float = 0.0
    restored: bool = False
    best: dict[str, Any] = field(default_factory=lambda: {"val/mpjpe_mm": math.inf})
    test: dict[str, np.ndarray] = field(default_factory=dict)
    tracker: Any = None

    @property
    def plain_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)


def setup_worker(config: dict[str, Any], rank: int, world: int, device: torch.device,
                 prepare_model: Callable[[torch.nn.Module], torch.nn.Module]) -> Worker:
    """Seeded model (wrapped by `prepare_model`, e.g. Ray's DDP), AdamW, lr schedule and AMP scaler on `device`.

    No FLOPs counting here: the driver counts them once (config["gflops"]), so no rank keeps the others waiting."""
    from h2ot.models import build_model

    cfg = train_config_from_dict(config["cfg"])
    torch.set_num_threads(max(1, cfg.scaling.torch_threads))
    seed_everything(cfg.optim.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = prepare_model(build_model(cfg.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler, per_step = build_lr_scheduler(optimizer, cfg.optim)
    settings = step_settings(cfg, device)
    return Worker(config, cfg, rank, world, device, model, optimizer, scheduler, per_step,
                  torch.amp.GradScaler(device.type, enabled=settings.amp), settings,
                  torch.Generator().manual_seed(cfg.optim.seed * 1000 + rank),
                  Path(tempfile.mkdtemp(prefix="h2ot-best-")))


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load an AMP scaler's state unless it is empty: a run saved where AMP was off (CPU) resumes on a GPU."""
    if state:
        scaler.load_state_dict(state)


def check_same_run(state: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """ConfigMismatch unless the checkpoint was written for this config and these shards (older checkpoints
    without hashes are resumed with a warning)."""
    for key, what in (("config_hash", "config (model, optim, loss)"), ("manifest_hash", "shards")):
        saved, now = state.get(key), config.get(key)
        if saved is None:
            log.warning("%s: the checkpoint holds no %s; cannot check that it belongs to this run", where, key)
        elif saved != now:
            raise ConfigMismatch(
                f"{where}: this run name already holds a run with another {what} ({key} {str(saved)[:12]} != "
                f"{str(now)[:12]}); choose another run name (run.name), or leave it unset for one derived from the "
                f"config and data, or delete that run's folder")


def restore(w: Worker, checkpoint: Any) -> None:
    """Resume from a Ray Train checkpoint: weights, optimizer, schedule, scaler, counters, best model file."""
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location=w.device, weights_only=True)
        check_same_run(state, w.config, str(checkpoint.path))
        if (Path(d) / BEST_MODEL_FILE).is_file():
            shutil.copy(Path(d) / BEST_MODEL_FILE, w.best_dir / BEST_MODEL_FILE)
    w.plain_model.load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    restore_scaler(w.scaler, state["scaler"])
    w.epoch, w.global_step, w.best = int(state["epoch"]) + 1, int(state["global_step"]), dict(state["best"])
    w.elapsed, w.restored = float(state.get("elapsed_s", 0.0)), True
    log.info("rank %d: resumed after epoch %d (step %d)", w.rank, w.epoch, w.global_step)


def start_epochs(w: Worker) -> None:
    """Before the first epoch of this attempt: this rank's test windows; rank 0's MLflow run and parameters."""
    from h2ot.config import to_dict
    from jobs.evaluation import check_frames, load_windows, shard_windows

    data_dir = w.config["data_dir"]
    w.test = shard_windows(load_windows(data_dir, "test", w.cfg.optim.eval_max_windows), w.rank, w.world)
    check_frames(w.test["pose_2d"].shape[1], w.cfg.model.frames, f"{data_dir}/test")
    if w.rank == 0 and w.config.get("mlflow"):
        from jobs.tracking import RunLogger

        w.tracker = RunLogger(w.config["mlflow"]["uri"], w.config["mlflow"]["run_id"])
        w.tracker.log_params({**to_dict(w.cfg), "data": {"dir": data_dir, "manifest_hash": w.config.get(
            "manifest_hash")}, "git_rev": w.config.get("git_rev"), "gflops": w.config.get("gflops", {})})


def train_epoch(w: Worker, shard: Any) -> dict[str, float]:
    """At most optim.steps_per_epoch steps over this rank's shard -> {loss (mean), steps, clips, wait_s, busy_s}."""
    from jobs.evaluation import check_frames

    ocfg, cap = w.cfg.optim, w.cfg.optim.steps_per_epoch
    w.model.train()
    steps, clips, loss_sum, wait, busy = 0, 0, torch.zeros((), dtype=torch.float64, device=w.device), 0.0, 0.0
    batches = shard.iter_torch_batches(
        batch_size=ocfg.batch_size, drop_last=True, dtypes=torch.float32, device=w.device,
        local_shuffle_buffer_size=ocfg.batch_size * SHUFFLE_BUFFER_BATCHES, local_shuffle_seed=ocfg.seed + w.epoch,
        prefetch_batches=PREFETCH_BATCHES,
    )
    t_mark = time.perf_counter()
    for batch in batches:
        if cap is not None and steps >= cap:
            break
        t_data = time.perf_counter()
        wait += t_data - t_mark
        if steps == 0:
            check_frames(batch["pose_2d"].shape[1], w.cfg.model.frames, f"{w.config['data_dir']}/train")
        if w.config.get("fail_at_step") == w.global_step and not w.restored:
            raise InjectedFailure(f"injected failure at step {w.global_step} (rank {w.rank})")
        loss_sum += train_step(w.model, batch, w.optimizer, w.scaler, w.settings, w.gen)
        if w.schedule_per_step:
            w.scheduler.step()
        steps, w.global_step, clips = steps + 1, w.global_step + 1, clips + batch["pose_2d"].shape[0]
        t_mark = time.perf_counter()
        busy += t_mark - t_data
    if steps == 0:
        raise ValueError(f"{w.config['data_dir']}/train: no full batch of {ocfg.batch_size} clips for this worker")
    if not w.schedule_per_step:
        w.scheduler.step()
    w.elapsed += wait + busy
    return {"loss": float(loss_sum) / steps, "steps": steps, "clips": clips, "wait_s": wait, "busy_s": busy}


def check_collective_device(tensor: torch.Tensor) -> None:
    """Raise unless the process group's backend can take `tensor` where it lives (NCCL: CUDA tensors only;
    a per-device backend such as "cpu:gloo,cuda:nccl" takes both)."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if "nccl" in backend and "cpu" not in backend and tensor.device.type != "cuda":
        raise RuntimeError(f"the {backend} backend reduces CUDA tensors only; this one is on {tensor.device}")


def epoch_totals(stats: dict[str, float], device: torch.device) -> torch.Tensor:
    """[mean loss, clips/s, data wait s, train s, non-finite eval clips] of this rank, on its device (where its
    backend reduces)."""
    seconds = stats["wait_s"] + stats["busy_s"]
    return torch.tensor([stats["loss"], stats["clips"] / seconds, stats["wait_s"], seconds,
                         stats.get("nonfinite_clips", 0.0)], dtype=torch.float64, device=device)


def sync_epoch(stats: dict[str, float], sums: dict[str, Any], world: int, device: torch.device
               ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The epoch's train figures over all ranks (loss: mean; clips/s, wait and time: sums) and every rank's
    metric sums."""
    totals, gathered = epoch_totals(stats, device), [sums]
    if world > 1:
        import torch.distributed as dist

        check_collective_device(totals)
        dist.all_reduce(totals)
        gathered = [None] * world
        dist.all_gather_object(gathered, sums)
    loss, clips_per_s, wait, seconds, nonfinite = totals.tolist()
    return {"loss": loss / world, "clips_per_s": clips_per_s, "wait_s": wait, "seconds": seconds,
            "nonfinite_clips": nonfinite}, gathered


def validate(w: Worker, stats: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate this rank's test windows, merge over the ranks -> (epoch metrics, metric result with per_action).
    Raises Diverged when the training loss or the validation MPJPE is not finite."""
    from jobs.evaluation import evaluate, merge_sums, plain_sums

    ocfg = w.cfg.optim
    acc, timing = evaluate(w.plain_model, w.test, w.cfg.model.in_channels, ocfg.eval_batch_size, ocfg.test_flip)
    local_seconds = stats["wait_s"] + stats["busy_s"]
    stats, sums = sync_epoch({**stats, "nonfinite_clips": timing["nonfinite_clips"]}, plain_sums(acc), w.world,
                             w.device)
    result = merge_sums(sums).result()
    metrics = {
        "epoch": w.epoch + 1, "step": w.global_step, "train/loss": stats["loss"],
        "val/mpjpe_mm": result["mpjpe_mm"], "val/p_mpjpe_mm": result["p_mpjpe_mm"],
        "val/mpjve_mm": result["mpjve_mm"], "val/frames": result["frames"],
        "gflops": w.config.get("gflops", {}).get("gflops_linear", float("nan")),
        "clips_per_s": stats["clips_per_s"],  # training clips/s, all workers together
        "data_wait_frac": stats["wait_s"] / stats["seconds"], "lr": w.optimizer.param_groups[0]["lr"],
        "epoch_seconds": local_seconds + timing["seconds"],
        "train_time_s": w.elapsed,  # cumulative training time (this rank, evaluation excluded), for equal-time views
    }
    if stats["nonfinite_clips"] or not (math.isfinite(metrics["train/loss"]) and math.isfinite(
            metrics["val/mpjpe_mm"])):
        val = (f"{stats['nonfinite_clips']:.0f} test clips with NaN or infinite predictions"
               if stats["nonfinite_clips"] else f"val MPJPE {metrics['val/mpjpe_mm']} mm")
        last = f"its last checkpoint is epoch {w.epoch}" if w.epoch else "no checkpoint was written"
        raise Diverged(f"epoch {w.epoch + 1}: the run diverged (train loss {metrics['train/loss']}, {val}); {last}. "
                       "Lower optim.lr or set optim.grad_clip, then start a new run")
    return metrics, result


def save_and_report(w: Worker, metrics: dict[str, Any], result: dict[str, Any]) -> None:
    """ray.train.report of the epoch's metrics; rank 0 adds the checkpoint (training state, best model so far,
    metrics) and logs to MLflow."""
    import ray.train
    from ray.train import Checkpoint

    from h2ot.checkpoint import save_checkpoint
    from h2ot.config import to_dict

    is_best = metrics["val/mpjpe_mm"] < w.best["val/mpjpe_mm"]
    if is_best:
        w.best = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if w.rank == 0:
            hashes = {k: w.config.get(k) for k in ("config_hash", "manifest_hash")}
            torch.save({"model": w.plain_model.state_dict(), "optimizer": w.optimizer.state_dict(),
                        "scheduler": w.scheduler.state_dict(), "scaler": w.scaler.state_dict(), "epoch": w.epoch,
                        "global_step": w.global_step, "best": w.best, "elapsed_s": w.elapsed, **hashes},
                       Path(tmp) / STATE_FILE)
            if is_best:
                meta = {**hashes, "git_rev": w.config.get("git_rev"), "epoch": w.epoch + 1, "metrics": metrics,
                        "per_action": result["per_action"], "train_config": to_dict(w.cfg),
                        "data_dir": w.config["data_dir"]}
                save_checkpoint(w.best_dir / BEST_MODEL_FILE, w.model, w.cfg.model, meta)
            shutil.copy(w.best_dir / BEST_MODEL_FILE, Path(tmp) / BEST_MODEL_FILE)
            (Path(tmp) / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "best": w.best,
                                                              "per_action": result["per_action"]}))
            if w.tracker is not None:
                w.tracker.log_metrics(metrics, step=w.epoch + 1)
                if is_best:
                    w.tracker.log_dict(result["per_action"], "per_action.json")
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
    log.info("rank %d epoch %d/%d: %s", w.rank, w.epoch + 1, w.cfg.optim.epochs,
             {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: restore, then per epoch train, evaluate, report (module docstring)."""
    import ray.train
    import ray.train.torch

    ctx, w = ray.train.get_context(), None
    if ctx.get_world_rank() == 0 and not logging.getLogger().handlers:  # per-epoch lines in the worker's log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        w = setup_worker(config, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                         ray.train.torch.prepare_model)
        if (checkpoint := ray.train.get_checkpoint()) is not None:
            restore(w, checkpoint)
        if w.epoch >= w.cfg.optim.epochs:
            log.info("rank %d: all %d epochs already trained; nothing to do", w.rank, w.cfg.optim.epochs)
            return {"resumed_finished": True, "epochs": w.cfg.optim.epochs}
        start_epochs(w)
        metrics: dict[str, Any] = {}
        for epoch in range(w.epoch, w.cfg.optim.epochs):
            w.epoch = epoch
            stats = train_epoch(w, ray.train.get_dataset_shard("train"))
            metrics, result = validate(w, stats)
            save_and_report(w, metrics, result)
        if w.tracker is not None:
            _log_final(w.tracker, w.plain_model, w.test, w.cfg.model, w.best, w.best_dir / BEST_MODEL_FILE)
            w.tracker.close()  # sends what an MLflow outage held back, and says what was late or lost
        return {"best": w.best, "last": metrics}
    except NON_RETRYABLE as e:  # the same error again on every retry: end the run now, the driver says why
        log.error("rank %d: %s", ctx.get_world_rank(), e)
        return {"stopped": f"{type(e).__name__}: {e}"}
    finally:
        if w is not None:
            shutil.rmtree(w.best_dir, ignore_errors=True)


def _log_final(tracker: Any, model: torch.nn.Module, test: dict[str, np.ndarray], mcfg: ModelConfig,
               best: dict[str, Any], best_file: Path) -> None:
    """Rank 0 at the end: the best model file, the best metrics, and a picture of predicted vs GT skeletons."""
    import matplotlib.pyplot as plt

    from jobs.evaluation import skeleton_figure

    if best_file.is_file():
        tracker.log_artifact(best_file, "model")
    tracker.log_dict(best, "best_metrics.json")
    pred, target, _, frames = final_example(model, test, mcfg.in_channels)
    fig = skeleton_figure(pred, target, f"{test['action'][0]}, frame {frames} (last epoch)")
    tracker.log_figure(fig, "skeleton.png")
    plt.close(fig)


def final_example(model: torch.nn.Module, test: dict[str, np.ndarray], in_channels: int
                  ) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """The middle output frame of the first test window, on the CPU wherever the model runs:
    (pred [J, 3], target [J, 3], valid, original frame index)."""
    from jobs.evaluation import window_batch

    was_training = model.training
    model.eval()
    try:
        pred, target, valid, frames = eval_batch(model, window_batch(test, slice(0, 1)), in_channels, True)
    finally:
        model.train(was_training)
    k = pred.shape[1] // 2
    return pred[0, k].numpy(), target[0, k].numpy(), bool(valid[0, k]), int(frames[0, k])
