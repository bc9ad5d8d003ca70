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

EVAL_COLUMNS = ["pose_2d", "conf_2d", "pose_3d", "valid", "action"]


class ShardMismatch(ValueError):
    """The shards do not fit the model (window length, input channels)."""


def model_input(pose_2d: torch.Tensor, conf_2d: torch.Tensor | None, in_channels: int) -> torch.Tensor:
    """[B, T, J, 2] (+ confidence [B, T, J]) -> the model's [B, T, J, in_channels] input."""
    if in_channels == 2:
        return pose_2d
    if in_channels == 3:
        if conf_2d is None:
            raise ShardMismatch("the model takes (x, y, confidence) input but no conf_2d was given")
        return torch.cat([pose_2d, conf_2d.unsqueeze(-1).to(pose_2d.dtype)], dim=-1)
    raise ShardMismatch(f"model.in_channels must be 2 or 3, got {in_channels}")


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


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, np.ndarray], in_channels: int, batch_size: int = 64,
             test_flip: bool = True, device: torch.device | str = "cpu") -> tuple[Any, dict[str, float]]:
    """Run the model over windows -> (MetricAccumulator, {clips, seconds}). Restores the model's train mode."""
    from h2ot.metrics import MetricAccumulator
    from h2ot.models import predict

    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    n = len(data["valid"])
    start = time.perf_counter()
    try:
        for i in range(0, n, batch_size):
            x2 = torch.from_numpy(data["pose_2d"][i : i + batch_size]).to(device)
            conf = torch.from_numpy(data["conf_2d"][i : i + batch_size]).to(device) if in_channels == 3 else None
            out = predict(model, model_input(x2, conf, in_channels), test_flip=test_flip)
            target = torch.from_numpy(data["pose_3d"][i : i + batch_size])
            valid = torch.from_numpy(data["valid"][i : i + batch_size]).bool()
            fi = out.frame_indices.cpu() if out.frame_indices is not None else None
            if fi is not None and fi.shape[1] != target.shape[1]:
                target = torch.gather(target, 1, fi[:, :, None, None].expand(-1, -1, *target.shape[2:]))
                valid = torch.gather(valid, 1, fi)
            acc.update(out.pose_3d.float().cpu(), target, valid, [str(a) for a in data["action"][i : i + batch_size]])
    finally:
        model.train(was_training)
    return acc, {"clips": float(n), "seconds": time.perf_counter() - start}


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
