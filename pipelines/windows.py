"""Sliding windows over a sequence, with edge padding by replication and a per-frame `valid` mask.

For a sequence of L frames, windows of T frames and stride s:

    n_windows = 1 + max(0, ceil((L - T) / s))

The windows span (n - 1) * s + T frames, which is >= L; the surplus is split between both ends
(left = surplus // 2) and filled by repeating the first / last frame, as VideoPose3D's generators do.
`start` is the index in the sequence of a window's first frame: it is negative when the window begins in the
left padding. Frame t of a window is real when 0 <= start + t < L (`valid` 1), padding otherwise (`valid` 0).
With s = T (the test default) every real frame is in exactly one window; with s <= T in at least one.
"""

from __future__ import annotations

import math

import numpy as np


def num_windows(length: int, frames: int, stride: int) -> int:
    """Number of windows of `frames` frames and `stride` over a sequence of `length` >= 1 frames."""
    if length < 1 or frames < 1 or stride < 1:
        raise ValueError(f"length, frames and stride must be >= 1, got {length}, {frames}, {stride}")
    return 1 + max(0, math.ceil((length - frames) / stride))


def window_starts(length: int, frames: int, stride: int) -> np.ndarray:
    """[n_windows] int64: first frame of each window in the sequence (negative inside the left padding)."""
    n = num_windows(length, frames, stride)
    left = ((n - 1) * stride + frames - length) // 2
    return np.arange(n, dtype=np.int64) * stride - left


def cut_windows(x: np.ndarray, starts: np.ndarray, frames: int) -> np.ndarray:
    """x: [L, ...] -> [n_windows, frames, ...], padding by replicating the edge frames."""
    idx = np.clip(starts[:, None] + np.arange(frames)[None, :], 0, len(x) - 1)
    return x[idx]


def valid_mask(length: int, starts: np.ndarray, frames: int) -> np.ndarray:
    """[n_windows, frames] uint8: 1 for real frames, 0 for padding."""
    t = starts[:, None] + np.arange(frames)[None, :]
    return ((t >= 0) & (t < length)).astype(np.uint8)
