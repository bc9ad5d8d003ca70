"""The one train-loop function every Ray Train run uses (`h2ot train`, Ray Tune trials, the demo).

It touches Ray only through `ray.train` (`get_context`, `get_dataset_shard`, `report`, `get_checkpoint`) and
`ray.train.torch` (device, DDP wrapping). Per epoch: at most `optim.steps_per_epoch` steps of AdamW on the paper's
weighted loss (flip augmentation, gradient clipping, AMP on GPU), exponential lr decay, evaluation on the test
split (shared over the ranks), then `ray.train.report(metrics, checkpoint)` with the full training state. A
restart (failure, or the same run name again) resumes from `get_checkpoint()` and skips finished epochs.

`config` (plain dict, see `jobs.train.loop_config`): cfg (TrainConfig as a dict), data_dir, manifest_hash,
git_rev, mlflow {uri, run_id} or None, fail_at_step (fault injection for tests: raise at that global step,
only while no checkpoint was restored).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def flip_half(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a random half of the clips (input x [B, T, J, C] and target y [B, T, J, 3] together)."""
    from h2ot.skeleton import flip_pose

    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(mask, flip_pose(x), x), torch.where(mask, flip_pose(y), y)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, ocfg: Any) -> tuple[Any, bool]:
    """(scheduler, per_step): "exponential" steps once per epoch, "cosine" once per training step.

    cosine: linear warm-up over optim.warmup_steps, then half a cosine from lr to 0 at the run's last step
    (epochs x steps_per_epoch, so the cap must be set).
    """
    if ocfg.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ocfg.lr_decay), False
    if ocfg.lr_schedule != "cosine":
        raise ValueError(f"optim.lr_schedule: unknown schedule {ocfg.lr_schedule!r}; known: exponential, cosine")
    if not ocfg.steps_per_epoch:
        raise ValueError("optim.lr_schedule=cosine needs optim.steps_per_epoch (the run's length in steps)")
    total, warmup = ocfg.epochs * ocfg.steps_per_epoch, max(0, ocfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return getattr(model, "module", model).state_dict()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    from h2ot.checkpoint import save_checkpoint
    from h2ot.config import config_from_dict, to_dict
    from h2ot.flops import model_gflops
    from h2ot.losses import pose_loss
    from h2ot.models import build_model
    from jobs.evaluation import (
        check_frames,
        evaluate,
        load_windows,
        merge_sums,
        model_input,
        plain_sums,
        shard_windows,
    )

    cfg = config_from_dict(config["cfg"], "train")
    mcfg, ocfg = cfg.model, cfg.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and not logging.getLogger().handlers:  # per-epoch lines in the driver's output
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, cfg.scaling.torch_threads))
    seed_everything(ocfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()

    model = build_model(mcfg)
    gflops = model_gflops(model, mcfg) if rank == 0 else {}
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ocfg.lr, weight_decay=ocfg.weight_decay)
    scheduler, schedule_per_step = build_lr_scheduler(optimizer, ocfg)
    use_amp = bool(ocfg.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, global_step, best, elapsed = 0, 0, {"val/mpjpe_mm": math.inf}, 0.0
    best_dir = Path(tempfile.mkdtemp(prefix="h2ot-best-"))  # this worker's copy of the best model so far
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
            if (Path(d) / BEST_MODEL_FILE).is_file():
                shutil.copy(Path(d) / BEST_MODEL_FILE, best_dir / BEST_MODEL_FILE)
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, global_step, best = int(state["epoch"]) + 1, int(state["global_step"]), dict(state["best"])
        elapsed = float(state.get("elapsed_s", 0.0))
        log.info("rank %d: resumed after epoch %d (step %d)", rank, start_epoch, global_step)
    if start_epoch >= ocfg.epochs:
        log.info("rank %d: all %d epochs already trained; nothing to do", rank, ocfg.epochs)
        return {"resumed_finished": True, "epochs": ocfg.epochs}

    test = shard_windows(load_windows(config["data_dir"], "test", ocfg.eval_max_windows), rank, world)
    check_frames(test["pose_2d"].shape[1], mcfg.frames, f"{config['data_dir']}/test")
    tracker = None
    if rank == 0 and config.get("mlflow"):
        from jobs.tracking import RunLogger

        tracker = RunLogger(config["mlflow"]["uri"], config["mlflow"]["run_id"])
        tracker.log_params({**to_dict(cfg), "data": {"dir": config["data_dir"], "manifest_hash":
                            config.get("manifest_hash")}, "git_rev": config.get("git_rev"), "gflops": gflops})

    gen = torch.Generator().manual_seed(ocfg.seed * 1000 + rank)
    cap = ocfg.steps_per_epoch
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, ocfg.epochs):
        shard = ray.train.get_dataset_shard("train")
        model.train()
        steps, clips, loss_sum, wait, busy = 0, 0, 0.0, 0.0, 0.0
        batches = shard.iter_torch_batches(
            batch_size=ocfg.batch_size, drop_last=True, dtypes=torch.float32, device=device,
            local_shuffle_buffer_size=ocfg.batch_size * SHUFFLE_BUFFER_BATCHES, local_shuffle_seed=ocfg.seed + epoch,
            prefetch_batches=PREFETCH_BATCHES,
        )
        t_mark = time.perf_counter()
        for batch in batches:
            if cap is not None and steps >= cap:
                break
            t_data = time.perf_counter()
            wait += t_data - t_mark
            if steps == 0 and epoch == start_epoch:
                check_frames(batch["pose_2d"].shape[1], mcfg.frames, f"{config['data_dir']}/train")
            if config.get("fail_at_step") is not None and global_step == config["fail_at_step"] \
                        and restored is None:
                raise InjectedFailure(f"injected failure at step {global_step} (rank {rank})")
            x = model_input(batch["pose_2d"], batch["conf_2d"], mcfg.in_channels)
            y = batch["pose_3d"]
            if ocfg.flip_augment:
                x, y = flip_half(x, y, gen)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                out = model(x)
            fi = out.frame_indices
            valid = batch["valid"]
            if fi is not None and fi.shape[1] != y.shape[1]:  # seq2frame: the centre frames
                y = torch.gather(y, 1, fi[:, :, None, None].expand(-1, -1, *y.shape[2:]))
                valid = torch.gather(valid, 1, fi)
            loss, _ = pose_loss(out.pose_3d.float(), y, valid, cfg.loss.tc_weight, cfg.loss.velocity_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if ocfg.grad_clip and ocfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if schedule_per_step:
                scheduler.step()
            steps += 1
            global_step += 1
            clips += x.shape[0]
            loss_sum += float(loss.detach())
            t_mark = time.perf_counter()
            busy += t_mark - t_data
        if steps == 0:
            raise ValueError(f"{config['data_dir']}/train: no full batch of {ocfg.batch_size} clips for this worker")
        if not schedule_per_step:
            scheduler.step()
        train_seconds = wait + busy
        elapsed += train_seconds

        acc, timing = evaluate(getattr(model, "module", model), test, mcfg.in_channels, ocfg.eval_batch_size,
                               ocfg.test_flip, device)
        sums, totals = [plain_sums(acc)], torch.tensor([loss_sum / steps, clips / train_seconds, wait, train_seconds])
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, sums[0])
            sums = gathered
            dist.all_reduce(totals)
            totals[0] /= world
        result = merge_sums(sums).result()
        metrics = {
            "epoch": epoch + 1,
            "step": global_step,
            "train/loss": float(totals[0]),
            "val/mpjpe_mm": result["mpjpe_mm"],
            "val/p_mpjpe_mm": result["p_mpjpe_mm"],
            "val/mpjve_mm": result["mpjve_mm"],
            "val/frames": result["frames"],
            "gflops": gflops.get("gflops_linear", float("nan")) if rank == 0 else float("nan"),
            "clips_per_s": float(totals[1]),  # training clips/s, all workers together
            "data_wait_frac": float(totals[2] / totals[3]),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": train_seconds + timing["seconds"],
            "train_time_s": elapsed,  # cumulative training time (rank 0, evaluation excluded), for equal-time views
        }
        is_best = metrics["val/mpjpe_mm"] < best["val/mpjpe_mm"]
        if is_best:
            best = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({"model": _state_dict(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                            "global_step": global_step, "best": best, "elapsed_s": elapsed}, Path(tmp) / STATE_FILE)
                meta = {"manifest_hash": config.get("manifest_hash"), "git_rev": config.get("git_rev"),
                        "epoch": epoch + 1, "metrics": metrics, "per_action": result["per_action"],
                        "train_config": to_dict(cfg), "data_dir": config["data_dir"]}
                if is_best:
                    save_checkpoint(best_dir / BEST_MODEL_FILE, model, mcfg, meta)
                shutil.copy(best_dir / BEST_MODEL_FILE, Path(tmp) / BEST_MODEL_FILE)
                (Path(tmp) / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "best": best,
                                                                  "per_action": result["per_action"]}))
                if tracker is not None:
                    tracker.log_metrics(metrics, step=epoch + 1)
                    if is_best:
                        tracker.log_dict(result["per_action"], "per_action.json")
                from ray.train import Checkpoint

                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        log.info("rank %d epoch %d/%d: %s", rank, epoch + 1, ocfg.epochs,
                 {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})

    if tracker is not None:
        _log_final(tracker, getattr(model, "module", model), test, mcfg, best, best_dir / BEST_MODEL_FILE)
    shutil.rmtree(best_dir, ignore_errors=True)
    return {"best": best, "last": metrics}


def _log_final(tracker: Any, model: torch.nn.Module, test: dict[str, np.ndarray], mcfg: Any,
               best: dict[str, Any], best_file: Path) -> None:
    """Rank 0 at the end: the best model file, the best metrics, and a picture of predicted vs GT skeletons."""
    import matplotlib.pyplot as plt

    from h2ot.models import predict
    from jobs.evaluation import model_input, skeleton_figure

    if best_file.is_file():
        tracker.log_artifact(best_file, "model")
    tracker.log_dict(best, "best_metrics.json")
    x = torch.from_numpy(test["pose_2d"][:1])
    conf = torch.from_numpy(test["conf_2d"][:1])
    model.eval()
    with torch.no_grad():
        out = predict(model, model_input(x, conf, mcfg.in_channels), test_flip=True)
    k = out.pose_3d.shape[1] // 2  # the middle output frame
    t = int(out.frame_indices[0, k]) if out.frame_indices is not None else k
    fig = skeleton_figure(out.pose_3d[0, k].numpy(), test["pose_3d"][0, t],
                          f"{test['action'][0]}, frame {t} (last epoch)")
    tracker.log_figure(fig, "skeleton.png")
    plt.close(fig)
