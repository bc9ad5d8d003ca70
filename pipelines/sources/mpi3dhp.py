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
from pipelines.records import BadSequence, PipelineError, RawSequence, SeqKey
from pipelines.safe_npz import load_npz_cached, unwrap
from pipelines.sources.base import Plan, Source

# H36M-17 joint i <- 3DHP joint MPI3DHP_TO_H36M[i]
MPI3DHP_TO_H36M: tuple[int, ...] = (14, 8, 9, 10, 11, 12, 13, 15, 1, 16, 0, 5, 6, 7, 2, 3, 4)
WIDE_SEQUENCES = ("TS5", "TS6")  # 1920x1080 outdoor sequences


def _data(path: str) -> dict:
    npz = load_npz_cached(path)
    if "data" not in npz:
        raise PipelineError(f"{path}: missing key 'data' (found {sorted(npz)}); expected the preprocessed "
                            "3DHP test npz (data -> sequence -> data_3d/data_2d/valid)")
    d = unwrap(npz["data"])
    if not isinstance(d, dict):
        raise PipelineError(f"{path}: 'data' is a {type(d).__name__}, expected a dict of sequences")
    return d


class MPI3DHPSource(Source):
    name = "3dhp"

    def plan(self, cfg: PreprocessConfig) -> Plan:
        if not cfg.input:
            raise PipelineError("--input is required for 3dhp (data_test_3dhp.npz)")
        data = _data(cfg.input)
        self.default_test_subjects = tuple(str(s) for s in data)
        plan = Plan(inputs=[cfg.input], info={"synthetic": False, "joint_map_3dhp": list(MPI3DHP_TO_H36M)})
        for seq, entry in data.items():
            frames = len(entry["data_3d"]) if isinstance(entry, dict) and hasattr(entry.get("data_3d"), "__len__") \
                else 1
            plan.keys.append({"subject": str(seq), "action": "test", "camera": "cam", "file": cfg.input,
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
        idx = list(MPI3DHP_TO_H36M)
        width, height = entry.get("image_size") or ((1920, 1080) if key["subject"] in WIDE_SEQUENCES
                                                   else (2048, 2048))
        cam = Camera(name="cam", R=np.eye(3), t=np.zeros(3), fx=1.0, fy=1.0, cx=width / 2, cy=height / 2,
                     width=int(width), height=int(height))
        valid = entry.get("valid")
        if valid is not None:
            valid = np.asarray(valid).reshape(-1) > 0
        return RawSequence(source=self.name, subject=key["subject"], action="test", camera=cam,
                           pose_3d=x3[:, idx] / 1000.0, world=False, pose_2d_px=x2[:, idx], frame_valid=valid,
                           file=cfg.input)
