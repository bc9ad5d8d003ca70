"""Which ground-truth frames a model's output stands for: the bridge between PoseOutput and the loss/metrics.

seq2seq models output every frame of the window. seq2frame models output, in training mode, the frames their
TPMs kept (the training loss uses those frames' targets) and, in eval mode, the centre frame only (evaluation is
on the centre frame). In every case `PoseOutput.frame_indices` [B, T_out] holds the original frame index of
each output frame, so one gather selects the matching targets.
"""

from __future__ import annotations

import torch

from h2ot.models.base import PoseOutput


def select_frames(values: torch.Tensor, frame_indices: torch.Tensor) -> torch.Tensor:
    """values [B, T, ...] -> [B, T_out, ...] at frame_indices [B, T_out] (original frame positions)."""
    if frame_indices.ndim != 2 or frame_indices.shape[0] != values.shape[0]:
        raise ValueError(f"frame_indices {tuple(frame_indices.shape)} do not index values {tuple(values.shape)}")
    idx = frame_indices.to(values.device).long()
    idx = idx.reshape(idx.shape + (1,) * (values.ndim - 2)).expand(*idx.shape, *values.shape[2:])
    return torch.gather(values, 1, idx)


def select_targets(
    output: PoseOutput, pose_3d: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of a model's output frames.

    output: the model's PoseOutput (pose_3d [B, T_out, J, 3], frame_indices [B, T_out]);
    pose_3d: ground truth of the whole window [B, T, J, 3] (metres); valid: [B, T] (1 = real frame, 0 = padding).
    Returns (target [B, T_out, J, 3], valid [B, T_out] bool), aligned with output.pose_3d.
    """
    b, t = pose_3d.shape[:2]
    indices = output.frame_indices
    if indices.shape != output.pose_3d.shape[:2]:
        raise ValueError(f"frame_indices {tuple(indices.shape)} do not match pose_3d {tuple(output.pose_3d.shape)}")
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=pose_3d.device)
    return select_frames(pose_3d, indices), select_frames(valid.bool(), indices)
