"""What a source reader yields, the errors of the pipeline, and the per-sequence validation + preparation.

A source plans a list of `SeqKey`s (small dicts: subject, action, camera, file, estimated frames) and loads each
as a `RawSequence`. `prepare_sequence` turns a `RawSequence` into per-frame model inputs and targets; it is the
ONE per-sequence function both the Ray Data path and the single-process path call (with `pipelines.windows`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from h2ot.camera import Camera, normalize_screen_coordinates, project_to_2d
from h2ot.skeleton import NUM_JOINTS, ROOT_JOINT

SeqKey = dict[str, Any]  # {"subject", "action", "camera", "file", "frames", ...source specific}

ABSURD_COORD_M = 50.0  # |coordinate| above this (metres) is not a human in a room
ABSURD_BONE_M = 1.5  # no bone of the 17-joint skeleton is longer
MIN_DEPTH_M = 0.1  # joints must be in front of the camera
MAX_SEQUENCE_FRAMES = 500_000  # about 2.8 hours at 50 fps: longer is a corrupt frame count or frame time


def resampled_frames(duration_s: float, fps: float) -> int:
    """Frames of a motion of `duration_s` seconds resampled to `fps`; BadSequence above MAX_SEQUENCE_FRAMES."""
    frames = int(duration_s * fps) + 1
    if frames > MAX_SEQUENCE_FRAMES:
        raise BadSequence(f"{duration_s:.4g} s at {fps:g} fps is {frames} frames, more than {MAX_SEQUENCE_FRAMES}")
    return frames


class PipelineError(RuntimeError):
    """A whole input is unusable (unreadable file, missing key, bad option): the run stops with one line."""


class BadSequence(ValueError):
    """One sequence is unusable; it is quarantined with this reason (or the run fails with --strict)."""


@dataclass
class RawSequence:
    """One sequence as a source loaded it.

    pose_3d: [T, 17, 3] metres, world frame (z up) if `world`, else camera frame.
    pose_2d_px: [T, 17, 2] pixels from a detector/annotation, or None to project `pose_3d` through `camera`.
    conf_2d: [T, 17] detector scores, or None (1 for projected 2D).
    frame_valid: [T] bool, or None (all frames valid).
    """

    source: str
    subject: str
    action: str
    camera: Camera
    pose_3d: np.ndarray
    file: str = ""
    world: bool = True
    pose_2d_px: np.ndarray | None = None
    conf_2d: np.ndarray | None = None
    frame_valid: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedSequence:
    """Per-frame arrays of one sequence, ready for windowing.

    pose_2d: [T, 17, 2] float32 normalised screen coordinates; conf_2d: [T, 17] float32;
    pose_3d: [T, 17, 3] float32 metres, camera frame, root-relative; valid: [T] uint8.
    """

    subject: str
    action: str
    camera: str
    source: str
    pose_2d: np.ndarray
    conf_2d: np.ndarray
    pose_3d: np.ndarray
    valid: np.ndarray
    reprojection_px: float | None = None


def describe_value(value: Any, limit: int = 60) -> str:
    """A short, safe description of a value read from a file, for messages: never walks a nested structure
    (an unpickled list can have 2^40 leaves through shared references) nor prints a huge integer."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (str, bytes, int, float, bool, np.number)) or value is None:
        return repr(value[:limit] if isinstance(value, (str, bytes)) else value)[:limit]
    return f"a {type(value).__name__}"


def describe(key: SeqKey | RawSequence) -> str:
    """'file subject/action camera' for messages."""
    if isinstance(key, RawSequence):
        key = {"file": key.file, "subject": key.subject, "action": key.action, "camera": key.camera.name}
    cam = f" camera {key.get('camera')}" if key.get("camera") not in (None, "") else ""
    return f"{key.get('file', '?')}: {key.get('subject')}/{key.get('action')}{cam}"


def check_array(x: Any, what: str, last_dims: tuple[int, ...], min_frames: int) -> np.ndarray:
    """Validate a per-frame array [T, *last_dims]: numeric, right rank/shape, finite, long enough."""
    if not isinstance(x, np.ndarray):
        raise BadSequence(f"{what} is a {type(x).__name__}, not an array")
    if x.dtype.kind not in "fiu":
        raise BadSequence(f"{what} has dtype {x.dtype}, expected numbers")
    if x.ndim != 1 + len(last_dims):
        raise BadSequence(f"{what} has rank {x.ndim} (shape {x.shape}), expected [T, {', '.join(map(str, last_dims))}]")
    if tuple(x.shape[1:]) != last_dims:
        raise BadSequence(f"{what} has shape {x.shape}, expected [T, {', '.join(map(str, last_dims))}]"
                          + (" (wrong joint count)" if x.shape[1] != last_dims[0] else ""))
    if x.shape[0] == 0:
        raise BadSequence(f"{what} is empty (0 frames)")
    if x.shape[0] < min_frames:
        raise BadSequence(f"{what} is too short: {x.shape[0]} frames < min_frames {min_frames}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise BadSequence(f"{what} has NaN/inf at frame {int(np.argmax(bad))} ({int(bad.sum())} frames)")
    return x


def sequence_rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator seeded by `seed` and the sequence identity: the same noise whatever the order or path."""
    return np.random.default_rng([seed, zlib.crc32("/".join(parts).encode())])


def detector_noise(
    uv_px: np.ndarray, noise_px: float, dropout: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Detector-like 2D: Gaussian pixel noise of std `noise_px` per joint and frame, and per-joint dropout.

    Returns noisy pixels [T, 17, 2] and confidences [T, 17]: exp(-|e|^2 / (2 (2 noise_px)^2)) (1 when
    noise_px is 0); a dropped joint gets confidence 0 and an outlier offset of std 10 * max(noise_px, 5) px.
    """
    conf = np.ones(uv_px.shape[:-1], dtype=np.float64)
    if noise_px > 0:
        err = rng.normal(0.0, noise_px, size=uv_px.shape)
        uv_px = uv_px + err
        conf = np.exp(-(err**2).sum(-1) / (2 * (2 * noise_px) ** 2))
    if dropout > 0:
        drop = rng.random(uv_px.shape[:-1]) < dropout
        outlier = rng.normal(0.0, 10 * max(noise_px, 5.0), size=uv_px.shape)
        uv_px = np.where(drop[..., None], uv_px + outlier, uv_px)
        conf = np.where(drop, 0.0, conf)
    return uv_px, conf


def prepare_sequence(
    raw: RawSequence, min_frames: int = 1, noise_px: float = 0.0, dropout: float = 0.0, seed: int = 0
) -> PreparedSequence:
    """Validate a raw sequence, bring 3D to the camera frame (root-relative) and make normalised 2D.

    2D: the sequence's detections (truncated to the 3D length, as VideoPose3D does; shorter is an error) or the
    projection of the camera-frame 3D through `raw.camera` (with its distortion), plus optional detector noise.
    Raises BadSequence with the reason.
    """
    x3 = check_array(raw.pose_3d, "3D", (NUM_JOINTS, 3), min_frames).astype(np.float64)
    if np.abs(x3).max() > ABSURD_COORD_M:
        raise BadSequence(f"3D has absurd values (max |coordinate| {np.abs(x3).max():.3g} m > {ABSURD_COORD_M} m; "
                          "wrong units?)")
    from h2ot.skeleton import BONES

    child = [b[0] for b in BONES]
    parent = [b[1] for b in BONES]
    d = x3[:, child] - x3[:, parent]
    longest = np.sqrt((d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2).max())  # max |bone|, metres
    if longest > ABSURD_BONE_M:
        raise BadSequence(f"3D has absurd bone lengths (max {longest:.3g} m > {ABSURD_BONE_M} m; wrong units "
                          "or joint order?)")
    cam = raw.camera
    x_cam = cam.world_to_camera(x3) if raw.world else x3
    n = len(x_cam)
    valid = np.ones(n, dtype=np.uint8) if raw.frame_valid is None else np.asarray(raw.frame_valid, np.uint8)
    if len(valid) != n:
        raise BadSequence(f"valid-frame mask has {len(valid)} frames, 3D has {n}")
    reproj = None
    if raw.pose_2d_px is None:
        depth = x_cam[..., 2]
        if (depth < MIN_DEPTH_M).any():
            f = int(np.argmax((depth < MIN_DEPTH_M).any(axis=1)))
            raise BadSequence(f"joints behind camera {cam.name} (depth < {MIN_DEPTH_M} m) at frame {f}")
        uv = project_to_2d(x_cam, cam)
        conf = None
    else:
        uv = raw.pose_2d_px
        if not isinstance(uv, np.ndarray) or uv.ndim != 3 or uv.shape[1:] not in ((NUM_JOINTS, 2), (NUM_JOINTS, 3)):
            shape = getattr(uv, "shape", type(uv).__name__)
            raise BadSequence(f"2D has shape {shape}, expected [T, {NUM_JOINTS}, 2 or 3]")
        if len(uv) < n:
            raise BadSequence(f"2D/3D length mismatch: 2D has {len(uv)} frames, 3D has {n}")
        uv = check_array(uv[:n], "2D", uv.shape[1:], min_frames).astype(np.float64)
        conf = uv[..., 2] if uv.shape[-1] == 3 else raw.conf_2d
        uv = uv[..., :2]
        if np.abs(uv).max() > 10 * max(cam.width, cam.height):
            raise BadSequence(f"2D has absurd values (max |pixel| {np.abs(uv).max():.3g})")
        if raw.world or raw.meta.get("projectable", False):
            with np.errstate(all="ignore"):
                reproj = float(np.linalg.norm(uv - project_to_2d(x_cam, cam), axis=-1).mean())
    if noise_px > 0 or dropout > 0:
        uv, noise_conf = detector_noise(uv, noise_px, dropout,
                                        sequence_rng(seed, raw.subject, raw.action, cam.name))
        conf = noise_conf if conf is None else conf * noise_conf
    if conf is None:
        conf = np.ones((n, NUM_JOINTS))
    x_rel = x_cam - x_cam[:, ROOT_JOINT : ROOT_JOINT + 1]
    return PreparedSequence(
        subject=raw.subject, action=raw.action, camera=cam.name, source=raw.source,
        pose_2d=normalize_screen_coordinates(uv, cam.width, cam.height).astype(np.float32),
        conf_2d=np.asarray(conf, dtype=np.float32), pose_3d=x_rel.astype(np.float32), valid=valid,
        reprojection_px=reproj,
    )
