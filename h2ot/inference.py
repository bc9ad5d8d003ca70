"""Lifting a whole 2D keypoint sequence of any length to 3D with a fixed-window model.

seq2seq models (`cfg.seq2frame` false) see windows of `cfg.frames` frames every `stride` frames. The sequence
is first padded at both ends by repeating its first/last frame ("edge padding by replication") with
`(frames - stride) // 2` frames, so every real frame lies near the centre of some window, and a sequence
shorter than one window is padded up to it (centred). Overlapping predictions are stitched by a centre-weighted
average: a window's frame i counts with weight min(i + 1, frames - i), so frames predicted with context on both
sides dominate those at a window's edges.

seq2frame models see one window per frame, centred on it (edge-padded the same way); their output is that
centre frame.

Everything here is pure torch/numpy and deterministic (eval mode, no sampling); flip averaging uses
`h2ot.models.predict`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.models import predict
from h2ot.skeleton import ROOT_JOINT

DEFAULT_BATCH_SIZE = 16


@dataclass
class WindowPlan:
    """Where the windows of a T-frame sequence lie. Padded index p is sequence frame clip(p - pad_left, 0, T-1)."""

    frames: int  # T, the real sequence length
    window: int  # F, the model's input length
    stride: int
    pad_left: int
    pad_right: int
    starts: np.ndarray  # [W] first padded index of each window

    def sequence_frames(self, window_idx: int, positions: np.ndarray) -> np.ndarray:
        """Window positions (0..F-1) of window `window_idx` -> sequence frames; padded positions are dropped."""
        t = self.starts[window_idx] + np.asarray(positions) - self.pad_left
        return np.unique(t[(t >= 0) & (t < self.frames)])


@dataclass
class InferenceResult:
    """poses_3d: [T, 17, 3] metres, root-relative (pelvis at 0), camera frame (x right, y down, z forward).

    kept_positions[w][s]: window positions (0..F-1, sorted) that pruning stage s kept in window w;
    stage_tokens[s] / stage_blocks[s]: how many frames stage s keeps, before which block.
    Map positions to sequence frames with `plan.sequence_frames(w, positions)`.
    """

    poses_3d: np.ndarray
    plan: WindowPlan
    seq2frame: bool
    test_flip: bool
    device: str
    seconds: float
    stage_tokens: list[int] = field(default_factory=list)
    stage_blocks: list[int] = field(default_factory=list)
    kept_positions: list[list[np.ndarray]] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.plan.frames / max(self.seconds, 1e-9)


def plan_windows(frames: int, window: int, stride: int | None = None, seq2frame: bool = False) -> WindowPlan:
    """The windows covering a `frames`-long sequence for a model of `window` frames (module docstring).

    stride: seq2seq only; 1..window, default window // 2 (half-overlapping windows).
    """
    if frames < 1:
        raise ValueError(f"cannot run on {frames} frames; the sequence needs at least one")
    if window < 1:
        raise ValueError(f"the model window must be >= 1 frame, got {window}")
    if seq2frame:
        left = window // 2  # the centre position the hourglass keeps (frames // 2)
        return WindowPlan(frames, window, 1, left, window - 1 - left, np.arange(frames))
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"--stride must be between 1 and the model's {window} frames, got {stride}")
    margin = (window - stride) // 2
    if frames + 2 * margin < window:
        left = (window - frames) // 2
        right = window - frames - left
    else:
        left = right = margin
    padded = frames + left + right
    starts = list(range(0, padded - window + 1, stride))
    if starts[-1] != padded - window:
        starts.append(padded - window)
    return WindowPlan(frames, window, stride, left, right, np.asarray(starts))


def centre_weights(window: int) -> np.ndarray:
    """Stitching weight of each window position: min(i + 1, window - i), [window]."""
    i = np.arange(window)
    return np.minimum(i + 1, window - i).astype(np.float64)


@torch.inference_mode()
def infer_sequence(
    model: nn.Module,
    cfg: ModelConfig,
    keypoints: np.ndarray,
    stride: int | None = None,
    test_flip: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
) -> InferenceResult:
    """Lift `keypoints` [T, J, cfg.in_channels] (normalised screen coordinates, see `h2ot.keypoints.model_input`)
    to 3D poses [T, J, 3] with `model` (eval mode is set here), window by window.
    """
    x = np.asarray(keypoints, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (cfg.joints, cfg.in_channels):
        raise ValueError(
            f"expected keypoints [T, {cfg.joints}, {cfg.in_channels}] for this model, got {list(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise ValueError("keypoints contain NaN or infinite values; fill gaps first (h2ot.keypoints.fill_gaps)")
    plan = plan_windows(x.shape[0], cfg.frames, stride, cfg.seq2frame)
    device = torch.device(device)
    model = model.to(device).eval()
    padded = np.concatenate(
        [np.repeat(x[:1], plan.pad_left, axis=0), x, np.repeat(x[-1:], plan.pad_right, axis=0)], axis=0
    )
    padded_t = torch.from_numpy(padded).to(device)
    total = np.zeros((padded.shape[0], cfg.joints, 3))
    weight_sum = np.zeros(padded.shape[0])
    weights = centre_weights(cfg.frames)
    kept: list[list[np.ndarray]] = []
    stage_tokens: list[int] = []
    poses_seq2frame: list[np.ndarray] = []

    start_time = time.perf_counter()
    for first in range(0, len(plan.starts), batch_size):
        starts = plan.starts[first : first + batch_size]
        batch = torch.stack([padded_t[s : s + cfg.frames] for s in starts])
        out = predict(model, batch, test_flip=test_flip)
        pose = out.pose_3d.float().cpu().numpy().astype(np.float64)  # [B, T_out, J, 3]
        stages = [k.cpu().numpy() for k in out.kept_indices]  # each [B, n_s]
        stage_tokens = [int(k.shape[1]) for k in stages]
        frame_idx = out.frame_indices.cpu().numpy()
        for b, s in enumerate(starts):
            kept.append([np.sort(k[b]) for k in stages])
            if cfg.seq2frame:  # the output frame that is the window's centre (eval mode returns only that one)
                centre = int(np.argmax(frame_idx[b] == cfg.frames // 2))
                poses_seq2frame.append(pose[b, centre])
            else:
                if pose.shape[1] != cfg.frames:
                    raise ValueError(f"a seq2seq model returned {pose.shape[1]} frames for a {cfg.frames}-frame window")
                total[s : s + cfg.frames] += weights[:, None, None] * pose[b]
                weight_sum[s : s + cfg.frames] += weights
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time

    if cfg.seq2frame:
        poses = np.stack(poses_seq2frame)
    else:
        poses = (total / weight_sum[:, None, None])[plan.pad_left : plan.pad_left + plan.frames]
    poses = poses - poses[:, ROOT_JOINT : ROOT_JOINT + 1]
    bad_frames = int((~np.isfinite(poses)).any(axis=(1, 2)).sum())
    if bad_frames:
        raise ValueError(f"the model produced NaN or infinite 3D poses for {bad_frames} of {len(poses)} frames; "
                         "its weights or the keypoints are broken")
    return InferenceResult(
        poses_3d=poses.astype(np.float32), plan=plan, seq2frame=cfg.seq2frame, test_flip=test_flip,
        device=str(device), seconds=seconds, stage_tokens=stage_tokens,
        stage_blocks=[b for b, _ in cfg.stages][: len(stage_tokens)], kept_positions=kept,
    )
