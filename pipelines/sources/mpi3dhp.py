"""MPI-INF-3DHP test set in its commonly used preprocessed npz form (as in P-STMO / MixSTE / PoseFormerV2).

Layout read: key `data`, a pickled dict sequence -> dict with
    `data_3d` [T, 17, 3] millimetres, camera frame (the 17 "univ" test joints, 3DHP order below),
    `data_2d` [T, 17, 2] pixels,  `valid` [T] (optional; 0 = frame without a valid annotation),
    `image_size` (optional) [width, height]; else TS5/TS6 are 1920x1080 and the others 2048x2048.
3DHP joint order: 0 head_top, 1 neck, 2 r_shoulder, 3 r_elbow, 4 r_wrist, 5 l_shoulder, 6 l_elbow, 7 l_wrist,
8 r_hip, 9 r_knee, 10 r_ankle, 11 l_hip, 12 l_knee, 13 l_ankle, 14 pelvis, 15 spine, 16 head (nose).
Mapped to H36M-17 by `MPI3DHP_TO_H36M` (3DHP neck -> H36M thorax, 3DHP head -> H36M neck/nose, head_top ->
head). One sequence per test sequence (subject = its name, action "test", camera "cam"); all go to test/ by
default. Invalid frames get `valid` 0, so they never count in metrics.
"""

from __future__ import annotations

import numpy as np

from h2ot.camera import Camera
from pipelines.config import PreprocessConfig
from pipelines.records import BadSequence, PipelineError, RawSequence, SeqKey, describe_value
from pipelines.safe_npz import load_npz_cached, unwrap
from pipelines.sources.base import Plan, Source

# H36M-17 joint i <- 3DHP joint MPI3DHP_TO_H36M[i]
MPI3DHP_TO_H36M: tuple[int, ...] = (14, 8, 9, 10, 11, 12, 13, 15, 1, 16, 0, 5, 6, 7, 2, 3, 4)
WIDE_SEQUENCES = ("TS5", "TS6")  # 1920x1080 outdoor sequences
MAX_IMAGE_PX = 100_000  # no camera's image is wider or taller


def _data(path: str) -> dict:
    npz = load_npz_cached(path)
    if "data" not in npz:
        raise PipelineError(f"{path}: missing key 'data' (found {sorted(npz)}); expected the preprocessed "
                            "3DHP test npz (data -> sequence -> data_3d/data_2d/valid)")
    d = unwrap(npz["data"])
    if not isinstance(d, dict):
        raise PipelineError(f"{path}: 'data' is a {type(d).__name__}, expected a dict of sequences")
    return d


def flat_numbers(value: object, max_len: int) -> np.ndarray | None:
    """`value` as an array if it is one, or a flat list/tuple of at most `max_len` plain numbers; else None.

    Never np.asarray on an arbitrary unpickled list: shared references make a few hundred bytes of pickle a
    nested list with 2^40 leaves.
    """
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) and len(value) <= max_len \
            and all(isinstance(v, (bool, int, float, np.number)) for v in value):
        try:
            return np.asarray(value, dtype=np.float64)
        except OverflowError:  # an integer beyond float64
            return None
    return None


def _image_size(value: object, sequence: str) -> tuple[int, int]:
    """`image_size` [width, height] (positive whole pixels), or the sequence's default when absent."""
    if value is None:
        return (1920, 1080) if sequence in WIDE_SEQUENCES else (2048, 2048)
    size = flat_numbers(value, 2)
    if size is None or size.dtype.kind not in "iuf" or size.shape != (2,):
        raise BadSequence(f"image_size is {describe_value(value)}; expected [width, height]")
    if not (np.isfinite(size).all() and (size >= 1).all() and (size <= MAX_IMAGE_PX).all()
            and (size == np.round(size)).all()):
        raise BadSequence(f"image_size is {size.tolist()}; expected two whole numbers of pixels in "
                          f"[1, {MAX_IMAGE_PX}]")
    return int(size[0]), int(size[1])


def _valid_frames(value: object, frames: int) -> np.ndarray | None:
    """`valid` as a [T] bool mask (None when absent); one number per frame."""
    if value is None:
        return None
    mask = flat_numbers(value, frames)
    if mask is None or mask.dtype.kind not in "biuf" or mask.size != frames:
        raise BadSequence(f"valid is {describe_value(value)}; expected one number per frame ({frames})")
    return mask.reshape(-1) > 0


class MPI3DHPSource(Source):
    name = "3dhp"

    def plan(self, cfg: PreprocessConfig) -> Plan:
        if not cfg.input:
            raise PipelineError("--input is required for 3dhp (data_test_3dhp.npz)")
        data = _data(cfg.input)
        self.default_test_subjects = tuple(s for s in data if isinstance(s, str))
        plan = Plan(inputs=[cfg.input], info={"synthetic": False, "joint_map_3dhp": list(MPI3DHP_TO_H36M)})
        for seq, entry in data.items():
            if not isinstance(seq, str):
                plan.quarantine.append({"file": cfg.input, "subject": describe_value(seq), "action": "test",
                                        "camera": "cam", "reason": f"data: sequence key {describe_value(seq)} "
                                        f"is a {type(seq).__name__}, not a string"})
                continue
            x3 = entry.get("data_3d") if isinstance(entry, dict) else None
            frames = int(x3.shape[0]) if isinstance(x3, np.ndarray) and x3.ndim >= 1 else 1
            plan.keys.append({"subject": seq, "action": "test", "camera": "cam", "file": cfg.input,
                              "frames": frames})
        return plan

    def load(self, key: SeqKey, cfg: PreprocessConfig) -> RawSequence:
        entry = _data(cfg.input)[key["subject"]]
        if not isinstance(entry, dict) or "data_3d" not in entry or "data_2d" not in entry:
            raise BadSequence("sequence entry must be a dict with data_3d and data_2d")
        x3, x2 = entry["data_3d"], entry["data_2d"]
        for name, x, c in (("data_3d", x3, 3), ("data_2d", x2, 2)):
            if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[1:] != (17, c):
                raise BadSequence(f"{name} has shape {getattr(x, 'shape', type(x).__name__)}, expected [T, 17, {c}]")
            if x.dtype.kind not in "iuf":
                raise BadSequence(f"{name} has dtype {x.dtype}, expected numbers")
        idx = list(MPI3DHP_TO_H36M)
        width, height = _image_size(entry.get("image_size"), key["subject"])
        cam = Camera(name="cam", R=np.eye(3), t=np.zeros(3), fx=1.0, fy=1.0, cx=width / 2, cy=height / 2,
                     width=width, height=height)
        valid = _valid_frames(entry.get("valid"), len(x3))
        return RawSequence(source=self.name, subject=key["subject"], action="test", camera=cam,
                           pose_3d=x3[:, idx] / 1000.0, world=False, pose_2d_px=x2[:, idx], frame_valid=valid,
                           file=cfg.input)
