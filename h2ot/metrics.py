"""Pose metrics as small pure functions (torch). Inputs in metres, results in millimetres.

Shapes: pred, target [B, T, J, 3]; valid [B, T] (1 = a real frame, 0 = edge padding). Every metric counts
valid frames only.
"""

from __future__ import annotations

from collections import defaultdict

import torch

M_TO_MM = 1000.0


def _valid(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return valid.to(device=like.device).bool()


def per_frame_error_m(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean joint position error of each frame, metres: [B, T]."""
    return (pred - target).norm(dim=-1).mean(dim=-1)


def mpjpe_mm(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Protocol 1: mean per-joint position error over valid frames, mm."""
    mask = _valid(valid, pred)
    return per_frame_error_m(pred, target)[mask].mean() * M_TO_MM


def procrustes_align(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Align each pose of pred [N, J, 3] to target [N, J, 3] by the best similarity transform
    (scale, rotation with reflection fixed, translation)."""
    pred, target = pred.double(), target.double()
    mu_p, mu_t = pred.mean(dim=1, keepdim=True), target.mean(dim=1, keepdim=True)
    p, t = pred - mu_p, target - mu_t
    norm_p = p.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
    norm_t = t.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
    p, t = p / norm_p, t / norm_t
    u, s, vh = torch.linalg.svd(t.transpose(1, 2) @ p)  # [N, 3, 3]
    v = vh.transpose(1, 2)
    # Fix reflections: flip the last singular vector where det(R) < 0.
    sign = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    v = torch.cat([v[:, :, :2], v[:, :, 2:] * sign[:, None, None]], dim=2)
    s = torch.cat([s[:, :2], s[:, 2:] * sign[:, None]], dim=1)
    rot = v @ u.transpose(1, 2)
    scale = s.sum(dim=1)[:, None, None] * norm_t / norm_p
    return (scale * (pred - mu_p) @ rot + mu_t).float()


def p_mpjpe_mm(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Protocol 2: MPJPE after per-frame Procrustes alignment, mm."""
    mask = _valid(valid, pred)
    p, t = pred[mask], target[mask]  # [N, J, 3]
    return (procrustes_align(p, t) - t).norm(dim=-1).mean() * M_TO_MM


def velocity_error_terms(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step velocity errors (metres/frame, [B, T-1]) and the mask of steps whose two frames are valid."""
    mask = _valid(valid, pred)
    err = ((pred[:, 1:] - pred[:, :-1]) - (target[:, 1:] - target[:, :-1])).norm(dim=-1).mean(dim=-1)
    return err, mask[:, 1:] & mask[:, :-1]


def mpjve_mm(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-joint velocity error, mm/frame, over steps t-1 -> t with both frames valid."""
    err, mask = velocity_error_terms(pred, target, valid)
    return err[mask].mean() * M_TO_MM


class MetricAccumulator:
    """Sums MPJPE / P-MPJPE / MPJVE over batches (valid frames only), overall and per action.

    Frames are weighted equally: the result is the mean over every valid frame seen.
    """

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def update(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, actions: list[str] | None = None
    ) -> None:
        pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
        mask = _valid(valid, pred).cpu()
        e1 = per_frame_error_m(pred, target)
        b = pred.shape[0]
        flat_p, flat_t = pred[mask], target[mask]
        e2_flat = (procrustes_align(flat_p, flat_t) - flat_t).norm(dim=-1).mean(dim=-1) if len(flat_p) else None
        e2 = torch.zeros_like(e1)
        if e2_flat is not None:
            e2[mask] = e2_flat
        ev, vmask = velocity_error_terms(pred, target, mask)
        actions = actions if actions is not None else ["all"] * b
        for i in range(b):
            for key in ("__all__", str(actions[i])):
                s = self.sums[key]
                s["frames"] += float(mask[i].sum())
                s["mpjpe"] += float(e1[i][mask[i]].sum())
                s["p_mpjpe"] += float(e2[i][mask[i]].sum())
                s["vel_steps"] += float(vmask[i].sum())
                s["mpjve"] += float(ev[i][vmask[i]].sum())

    @staticmethod
    def _summary(s: dict[str, float]) -> dict[str, float]:
        frames, steps = max(s["frames"], 1.0), max(s["vel_steps"], 1.0)
        return {
            "mpjpe_mm": s["mpjpe"] / frames * M_TO_MM,
            "p_mpjpe_mm": s["p_mpjpe"] / frames * M_TO_MM,
            "mpjve_mm": s["mpjve"] / steps * M_TO_MM,
            "frames": int(s["frames"]),
        }

    def result(self) -> dict:
        """{mpjpe_mm, p_mpjpe_mm, mpjve_mm, frames, per_action: {action: {...}}}."""
        out = self._summary(self.sums["__all__"])
        out["per_action"] = {k: self._summary(v) for k, v in sorted(self.sums.items()) if k != "__all__"}
        return out


# --------------------------------------------------------------------------------------------- MPI-INF-3DHP
PCK_THRESHOLD_MM = 150.0
# The thresholds of the standard 3DHP evaluation (mpii_compute_3d_pck.m): 0, 5, ..., 150 mm (31 values).
AUC_THRESHOLDS_MM: tuple[float, ...] = tuple(float(t) for t in range(0, 151, 5))


def joint_errors_mm(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Euclidean error of every joint, mm: pred, target [B, T, J, 3] in metres -> [B, T, J]."""
    return (pred - target).norm(dim=-1) * M_TO_MM


def _valid_joint_errors(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, joints: list[int] | None
) -> torch.Tensor:
    """Flat errors (mm) of the selected joints of the valid frames: [N]."""
    err = joint_errors_mm(pred.float(), target.float())
    if joints is not None:
        err = err[..., joints]
    return err[_valid(valid, pred)].flatten()


def pck_from_errors(errors_mm: torch.Tensor, threshold_mm: float = PCK_THRESHOLD_MM) -> torch.Tensor:
    """Percentage (0-100) of joint errors strictly below threshold_mm (the 3DHP convention)."""
    return (errors_mm < threshold_mm).double().mean() * 100.0


def auc_from_errors(errors_mm: torch.Tensor, thresholds_mm: tuple[float, ...] = AUC_THRESHOLDS_MM) -> torch.Tensor:
    """Area under the PCK curve, %: the mean of the PCKs at thresholds_mm (3DHP: 0, 5, ..., 150 mm)."""
    return torch.stack([pck_from_errors(errors_mm, t) for t in thresholds_mm]).mean()


def pck_3dhp(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    threshold_mm: float = PCK_THRESHOLD_MM,
    joints: list[int] | None = None,
) -> torch.Tensor:
    """3DHP PCK, %: share of joints (of valid frames; `joints` selects a subset) with error < threshold_mm.
    pred, target [B, T, J, 3] metres; valid [B, T]."""
    return pck_from_errors(_valid_joint_errors(pred, target, valid, joints), threshold_mm)


def auc_3dhp(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    thresholds_mm: tuple[float, ...] = AUC_THRESHOLDS_MM,
    joints: list[int] | None = None,
) -> torch.Tensor:
    """3DHP AUC, %: mean PCK over thresholds_mm (0-150 mm in steps of 5). Shapes as pck_3dhp."""
    return auc_from_errors(_valid_joint_errors(pred, target, valid, joints), thresholds_mm)


def per_action_mean(
    values: torch.Tensor | list[float], actions: list[str], weights: torch.Tensor | list[float] | None = None
) -> dict[str, float]:
    """Weighted mean of per-item values grouped by action (or 3DHP test sequence): {action: mean}, sorted.
    values, weights: [N] (weights default 1, e.g. the valid frames of each clip); actions: N names."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    weights = torch.ones_like(values) if weights is None else torch.as_tensor(weights, dtype=torch.float64).flatten()
    if not len(values) == len(weights) == len(actions):
        raise ValueError(f"per_action_mean: {len(values)} values, {len(weights)} weights, {len(actions)} actions")
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for v, w, a in zip(values.tolist(), weights.tolist(), actions):
        sums[str(a)][0] += v * w
        sums[str(a)][1] += w
    return {a: s / w if w else float("nan") for a, (s, w) in sorted(sums.items())}


class PCKAccumulator:
    """Counts joints below each 3DHP threshold over batches (valid frames only), overall and per action, so the
    result is exact over the whole test set: {pck, auc, joints, per_action: {action: {pck, auc, joints}}} (%)."""

    def __init__(self, thresholds_mm: tuple[float, ...] = AUC_THRESHOLDS_MM, pck_threshold_mm: float = PCK_THRESHOLD_MM,
                 joints: list[int] | None = None) -> None:
        self.thresholds = torch.tensor(thresholds_mm, dtype=torch.float64)
        self.pck_threshold = pck_threshold_mm
        self.joints = joints
        self.counts: dict[str, torch.Tensor] = {}  # action -> [len(thresholds) + 2]: below each, below pck, total

    def update(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, actions: list[str] | None = None
    ) -> None:
        pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
        mask = _valid(valid, pred).cpu()
        err = joint_errors_mm(pred, target).double()
        if self.joints is not None:
            err = err[..., self.joints]
        actions = actions if actions is not None else ["all"] * pred.shape[0]
        for i in range(pred.shape[0]):
            e = err[i][mask[i]].flatten()
            row = torch.cat([
                (e[None, :] < self.thresholds[:, None]).sum(dim=1).double(),
                (e < self.pck_threshold).sum().double()[None],
                torch.tensor([float(e.numel())], dtype=torch.float64),
            ])
            for key in ("__all__", str(actions[i])):
                self.counts[key] = self.counts.get(key, torch.zeros_like(row)) + row

    def _summary(self, row: torch.Tensor) -> dict[str, float]:
        total = max(float(row[-1]), 1.0)
        return {
            "pck": float(row[-2]) / total * 100.0,
            "auc": float(row[:-2].mean()) / total * 100.0,
            "joints": int(row[-1]),
        }

    def result(self) -> dict:
        out = self._summary(self.counts.get("__all__", torch.zeros(len(self.thresholds) + 2, dtype=torch.float64)))
        out["per_action"] = {k: self._summary(v) for k, v in sorted(self.counts.items()) if k != "__all__"}
        return out
