"""Evaluation shared by the train loop (each epoch) and `h2ot eval`: test windows -> MPJPE / P-MPJPE / MPJVE.

Plain PyTorch over numpy windows read with `pipelines.shards.read_split` (no Ray): metrics on valid (non-padded)
frames only, overall and per action, with test-time flip averaging. Shapes: pose_2d [N, T, J, 2],
pose_3d [N, T, J, 3] metres, valid [N, T]. A model's output frames (`PoseOutput.frame_indices`) select the
target frames, so seq2frame models are scored on the centre frames.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from h2ot.engine import ShardMismatch, eval_batch

__all__ = ["ShardMismatch", "check_frames", "evaluate", "load_windows", "merge_sums", "plain_sums", "shard_windows",
           "skeleton_figure", "window_batch"]
BATCH_COLUMNS = ("pose_2d", "conf_2d", "pose_3d", "valid")  # the tensors of a batch (h2ot.engine)
EVAL_COLUMNS = [*BATCH_COLUMNS, "action"]


def check_frames(data_frames: int, model_frames: int, where: str) -> None:
    if data_frames != model_frames:
        raise ShardMismatch(
            f"{where}: the shards hold windows of {data_frames} frames but model.frames is {model_frames}; "
            f"set --set model.frames={data_frames} or preprocess with --frames {model_frames}"
        )


def load_windows(data_dir: str | Path, split: str = "test", max_windows: int | None = None) -> dict[str, np.ndarray]:
    """The split's windows as numpy (EVAL_COLUMNS); with max_windows, an evenly spaced deterministic subset."""
    from pipelines.shards import read_split

    data = read_split(data_dir, split, EVAL_COLUMNS)
    n = len(data["valid"])
    if n == 0:
        raise FileNotFoundError(f"{data_dir}: the {split} split holds no windows")
    if max_windows is not None and max_windows < n:
        idx = np.linspace(0, n - 1, max_windows).round().astype(np.int64)
        data = {k: v[idx] for k, v in data.items()}
    return data


def shard_windows(data: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s share of the windows (every world-th one) for data-parallel evaluation."""
    return {k: v[rank::world] for k, v in data.items()}


def window_batch(data: dict[str, np.ndarray], rows: slice | np.ndarray) -> dict[str, torch.Tensor]:
    """Rows of numpy windows -> a batch of tensors (pose_2d, conf_2d, pose_3d, valid) for h2ot.engine."""
    return {k: torch.from_numpy(np.array(data[k][rows])) for k in BATCH_COLUMNS}  # a copy: the arrays may be read-only


def evaluate(model: nn.Module, data: dict[str, np.ndarray], in_channels: int, batch_size: int = 64,
             test_flip: bool = True) -> tuple[Any, dict[str, float]]:
    """Run the model over windows -> (MetricAccumulator, {clips, seconds, nonfinite_clips}). Restores the model's
    train mode. Batches with a NaN or infinite prediction are left out of the metrics and counted in
    nonfinite_clips (the caller decides: a diverged run, a broken checkpoint).

    The model runs where it lives (h2ot.engine.eval_batch moves each batch there); metrics are summed on the CPU."""
    from h2ot.metrics import MetricAccumulator

    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    n, nonfinite = len(data["valid"]), 0
    start = time.perf_counter()
    try:
        for i in range(0, n, batch_size):
            rows = slice(i, i + batch_size)
            pred, target, valid, _ = eval_batch(model, window_batch(data, rows), in_channels, test_flip)
            if not bool(torch.isfinite(pred).all()):
                nonfinite += len(pred)
                continue
            acc.update(pred, target, valid, [str(a) for a in data["action"][rows]])
    finally:
        model.train(was_training)
    return acc, {"clips": float(n), "seconds": time.perf_counter() - start, "nonfinite_clips": float(nonfinite)}


def merge_sums(parts: list[dict[str, dict[str, float]]]) -> Any:
    """Merge MetricAccumulator.sums of several ranks into one accumulator."""
    from h2ot.metrics import MetricAccumulator

    acc = MetricAccumulator()
    for sums in parts:
        for key, s in sums.items():
            for name, value in s.items():
                acc.sums[key][name] += value
    return acc


def plain_sums(acc: Any) -> dict[str, dict[str, float]]:
    """An accumulator's sums as plain dicts (picklable across ranks)."""
    return {k: dict(v) for k, v in acc.sums.items()}


def skeleton_figure(pred: np.ndarray, target: np.ndarray, title: str = "") -> Any:
    """Matplotlib figure of predicted (red) vs ground-truth (black) skeletons, one frame each: [J, 3] metres."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from h2ot.skeleton import BONES

    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    for pose, color, label in ((target, "black", "ground truth"), (pred, "tab:red", "prediction")):
        for k, (j, p) in enumerate(BONES):
            # camera frame: x right, y down, z forward -> plot (x, z, -y) so the person stands upright
            ax.plot([pose[j, 0], pose[p, 0]], [pose[j, 2], pose[p, 2]], [-pose[j, 1], -pose[p, 1]], color=color,
                    label=label if k == 0 else None)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("z (m)")
    ax.set_zlabel("-y (m)")
    ax.legend(loc="upper right")
    ax.set_title(title)
    return fig
