"""Training losses (seq2seq, as HoT's MixSTE training): L = wMPJPE + 0.5 TC + 2.0 MPJVE.

pred, target: [B, T, J, 3] metres; valid: [B, T] mask of real (non-padded) frames.
"""

from __future__ import annotations

import torch

from h2ot.skeleton import JOINT_LOSS_WEIGHTS


def _joint_weights(like: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(JOINT_LOSS_WEIGHTS, dtype=like.dtype, device=like.device)
    if like.shape[-2] != len(w):
        raise ValueError(f"the weighted loss expects {len(w)} joints, got {like.shape[-2]}")
    return w


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, T, ...] over positions where mask [B, T] is set (0 if none)."""
    m = mask.to(values.dtype).reshape(mask.shape + (1,) * (values.ndim - mask.ndim)).expand_as(values)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def weighted_mpjpe(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean_j w_j * ||P - G|| over valid frames, metres."""
    return _masked_mean(_joint_weights(pred) * (pred - target).norm(dim=-1), valid)


def temporal_consistency(pred: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean w_j * (P_{t+1} - P_t)^2: smoothness of the prediction alone, steps with both frames valid."""
    step_valid = valid[:, 1:].bool() & valid[:, :-1].bool()
    diff = (pred[:, 1:] - pred[:, :-1]).pow(2).mean(dim=-1)  # [B, T-1, J]
    return _masked_mean(_joint_weights(pred) * diff, step_valid)


def velocity_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean ||(P_{t+1} - P_t) - (G_{t+1} - G_t)||, steps with both frames valid, metres."""
    step_valid = valid[:, 1:].bool() & valid[:, :-1].bool()
    err = ((pred[:, 1:] - pred[:, :-1]) - (target[:, 1:] - target[:, :-1])).norm(dim=-1)
    return _masked_mean(err, step_valid)


def loss_parts(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """{wmpjpe, tc, velocity} as tensors on pred's device; with T == 1 (seq2frame) only wmpjpe."""
    parts = {"wmpjpe": weighted_mpjpe(pred, target, valid)}
    if pred.shape[1] > 1:
        parts["tc"] = temporal_consistency(pred, valid)
        parts["velocity"] = velocity_loss(pred, target, valid)
    return parts


def _combine(parts: dict[str, torch.Tensor], tc_weight: float, velocity_weight: float) -> torch.Tensor:
    return parts["wmpjpe"] + tc_weight * parts.get("tc", 0.0) + velocity_weight * parts.get("velocity", 0.0)


def training_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, tc_weight: float = 0.5,
                  velocity_weight: float = 2.0) -> torch.Tensor:
    """The paper's seq2seq loss as one tensor, without reading any value back to the host (no device sync)."""
    return _combine(loss_parts(pred, target, valid), tc_weight, velocity_weight)


def pose_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, tc_weight: float = 0.5,
              velocity_weight: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's seq2seq loss and its parts as floats (for logging; reading them syncs a GPU)."""
    parts = loss_parts(pred, target, valid)
    return _combine(parts, tc_weight, velocity_weight), {k: float(v.detach()) for k, v in parts.items()}
