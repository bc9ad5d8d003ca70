"""Human3.6M in the VideoPose3D layout, with the published cameras built in (`h2ot.camera`).

- `--input data_3d_h36m.npz`: key `positions_3d`, a pickled dict subject -> action -> [T, 32, 3] (or
  [T, 17, 3]) world metres, z up. The 17 standard joints are kept (`H36M32_TO_17`).
- `--input-2d data_2d_h36m_<detector>.npz` (optional): key `positions_2d`, subject -> action -> list of the
  4 cameras' [T, 17, 2] pixels ([T, 17, 3] with scores), in `H36M_CAMERA_IDS` order; `metadata` optional.
  Detections longer than the 3D are truncated (as VideoPose3D); shorter ones are quarantined. Without it, 2D
  is the 3D projected through each camera (with distortion).

Several 3D files (`--input` a list of files, a folder of `data_3d_*.npz` or a glob): each file's sequences are
distinct sequences (the manifest names their file); the builder plans and reads each file in the task that
processes it (`units`). Detections (`--input-2d`) pair with one 3D file only.

One sequence = (subject, action, camera). Default split: train S1 S5 S6 S7 S8, test S9 S11.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

import numpy as np

from h2ot.camera import H36M_CAMERA_IDS, H36M_SUBJECTS, h36m_camera
from h2ot.skeleton import H36M32_TO_17, NUM_JOINTS
from pipelines.config import PreprocessConfig
from pipelines.records import BadSequence, PipelineError, RawSequence, SeqKey, describe_value
from pipelines.safe_npz import load_npz_cached, unwrap
from pipelines.sources.base import Plan, Source


def _positions(path: str, key: str) -> dict[str, Any]:
    data = load_npz_cached(path)
    if key not in data:
        raise PipelineError(f"{path}: missing key {key!r} (found {sorted(data)}); is this a VideoPose3D "
                            f"{'data_3d' if key == 'positions_3d' else 'data_2d'} file?")
    value = unwrap(data[key])
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: {key} is a {type(value).__name__}, expected a dict subject -> action")
    return value


FOLDER_PATTERN = "data_3d_*.npz"  # the 3D files of a folder given as --input
GLOB_CHARS = frozenset("*?[")


def input_files(spec: str | list[str] | None) -> list[str]:
    """The 3D files of `--input`: a file (as given), a folder (its data_3d_*.npz), a glob, or a list of those.

    Sorted by path (a list's order does not change the shards); PipelineError if nothing matches.
    """
    if not spec:
        raise PipelineError("--input is required for h36m (data_3d_h36m.npz, a folder of data_3d_*.npz or a glob)")
    if isinstance(spec, str):
        return _expand(spec)
    return sorted({f for item in spec for f in _expand(item)})


def _expand(item: str) -> list[str]:
    path = Path(item)
    if path.is_file():
        return [item]
    if path.is_dir():
        files = sorted(str(p) for p in path.glob(FOLDER_PATTERN) if p.is_file())
        if not files:
            raise PipelineError(f"{item}: a folder without VideoPose3D 3D files ({FOLDER_PATTERN}); give the files "
                                "themselves, or a glob such as 'DIR/*.npz'")
        return files
    if GLOB_CHARS & set(item):
        files = sorted(p for p in glob.glob(item) if Path(p).is_file())
        if not files:
            raise PipelineError(f"{item}: no file matches this pattern")
        return files
    raise PipelineError(f"{item}: no such file or folder")


class H36MSource(Source):
    name = "h36m"
    default_test_subjects = ("S9", "S11")
    default_train_subjects = ("S1", "S5", "S6", "S7", "S8")

    def units(self, cfg: PreprocessConfig) -> list[str]:
        files = input_files(cfg.input)
        if cfg.input_2d and len(files) > 1:
            raise PipelineError(f"--input-2d pairs one detections file with one 3D file; --input names {len(files)} "
                                "3D files: build each with its detections separately")
        return files

    def inputs(self, cfg: PreprocessConfig) -> list[str]:
        return self.units(cfg) + ([cfg.input_2d] if cfg.input_2d else [])

    def plan(self, cfg: PreprocessConfig) -> Plan:
        """The sequences of ONE 3D file (`cfg.input`; the builder plans the files of a list one by one)."""
        if not cfg.input:
            raise PipelineError("--input is required for h36m (data_3d_h36m.npz)")
        if not isinstance(cfg.input, str) or not Path(cfg.input).is_file():
            files = self.units(cfg)
            if len(files) > 1:
                raise PipelineError(f"{cfg.input}: names {len(files)} files; plan them one at a time (the builder "
                                    "does)")
            cfg = dataclasses.replace(cfg, input=files[0])
        positions = _positions(cfg.input, "positions_3d")
        plan = Plan(inputs=[cfg.input] + ([cfg.input_2d] if cfg.input_2d else []))
        if cfg.input_2d:
            _positions(cfg.input_2d, "positions_2d")  # fail early on an unreadable detections file
        for subject, actions in positions.items():
            if not isinstance(subject, str):
                plan.quarantine.append({"file": cfg.input, "subject": describe_value(subject), "action": None,
                                        "camera": None, "reason": f"positions_3d: subject key "
                                        f"{describe_value(subject)} is a {type(subject).__name__}, not a string"})
                continue
            if not isinstance(actions, dict):
                plan.quarantine.append({"file": cfg.input, "subject": subject, "action": None, "camera": None,
                                        "reason": f"subject entry is a {type(actions).__name__}, not a dict"})
                continue
            for action, arr in actions.items():
                reason = None
                if not isinstance(action, str):
                    reason = f"positions_3d[{subject!r}]: action key {describe_value(action)} is a " \
                             f"{type(action).__name__}, not a string"
                elif subject not in H36M_SUBJECTS:
                    reason = f"unknown subject {subject} for the camera table (known: {', '.join(H36M_SUBJECTS)})"
                if reason is not None:
                    name = action if isinstance(action, str) else describe_value(action)
                    plan.quarantine.append({"file": cfg.input, "subject": subject, "action": name,
                                            "camera": None, "reason": reason})
                    continue
                frames = int(arr.shape[0]) if isinstance(arr, np.ndarray) and arr.ndim >= 1 else 1
                for cam in H36M_CAMERA_IDS:
                    plan.keys.append({"subject": subject, "action": action, "camera": cam,
                                      "file": cfg.input, "frames": frames})
        plan.info = {"synthetic": False, "fps": 50, "detections": cfg.input_2d}
        return plan

    def load(self, key: SeqKey, cfg: PreprocessConfig) -> RawSequence:
        subject, action, cam_id = key["subject"], key["action"], key["camera"]
        x = _positions(key["file"], "positions_3d")[subject][action]
        if not isinstance(x, np.ndarray):
            raise BadSequence(f"3D entry is a {type(x).__name__}, not an array")
        if x.ndim == 3 and x.shape[1] == 32:
            x = x[:, list(H36M32_TO_17)]
        elif x.ndim == 3 and x.shape[1] != NUM_JOINTS:
            raise BadSequence(f"3D has {x.shape[1]} joints (shape {x.shape}), expected 32 or 17 (wrong joint count)")
        uv = None
        if cfg.input_2d:
            det = _positions(cfg.input_2d, "positions_2d")
            try:
                per_cam = det[subject][action]
            except (KeyError, TypeError, IndexError):
                raise BadSequence(f"no 2D detections for {subject}/{action} in {cfg.input_2d}") from None
            if not isinstance(per_cam, (list, tuple, np.ndarray)) or len(per_cam) != len(H36M_CAMERA_IDS):
                raise BadSequence(f"2D entry for {subject}/{action} is not a list of {len(H36M_CAMERA_IDS)} "
                                  "cameras")
            uv = per_cam[H36M_CAMERA_IDS.index(cam_id)]
            if not isinstance(uv, np.ndarray):
                raise BadSequence(f"2D entry is a {type(uv).__name__}, not an array")
        return RawSequence(source=self.name, subject=subject, action=action, camera=h36m_camera(subject, cam_id),
                           pose_3d=x, file=key["file"], world=True, pose_2d_px=uv)
