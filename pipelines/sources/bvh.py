"""BVH motion files: parser, forward kinematics, mapping to H36M-17 by joint names, virtual cameras.

Input: a BVH file or a folder searched recursively for `*.bvh`; subject = the file's folder name, action = the
file name without `.bvh`. One sequence = (subject, action, virtual camera).

- Joint mapping: `DEFAULT_JOINT_NAMES` lists accepted BVH names per H36M joint (first found wins); the config's
  `joint_map` {h36m_name: bvh_name} overrides entries. A missing joint quarantines the file.
- Forward kinematics: local = translate(OFFSET + position channels) @ rotations in the CHANNELS order
  (intrinsic: R = R_c1 R_c2 R_c3, degrees); global = parent global @ local.
- Units: chosen so the leg (hip->knee->ankle) is human: the closest of metres, cm, mm, inches, CMU units.
- Up axis: the axis along which the head is above the pelvis in the first frame; rotated to z up.
- Resampled from the file's `Frame Time` to `fps` by linear interpolation.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from h2ot.skeleton import JOINT_NAMES, NUM_JOINTS
from pipelines.config import PreprocessConfig
from pipelines.records import BadSequence, PipelineError, RawSequence, SeqKey, resampled_frames
from pipelines.sources.base import Plan, Source, virtual_cameras
from pipelines.sources.cmu import FLOOR_ANKLE_M, euler_matrix

DEFAULT_JOINT_NAMES: dict[str, tuple[str, ...]] = {
    "pelvis": ("Hips", "Hip", "hip", "pelvis", "Pelvis", "root"),
    "r_hip": ("RightUpLeg", "RightHip", "RHip", "rThigh", "RightThigh"),
    "r_knee": ("RightLeg", "RightKnee", "RKnee", "rShin", "RightShin"),
    "r_ankle": ("RightFoot", "RightAnkle", "RAnkle", "rFoot"),
    "l_hip": ("LeftUpLeg", "LeftHip", "LHip", "lThigh", "LeftThigh"),
    "l_knee": ("LeftLeg", "LeftKnee", "LKnee", "lShin", "LeftShin"),
    "l_ankle": ("LeftFoot", "LeftAnkle", "LAnkle", "lFoot"),
    "spine": ("Spine1", "Spine", "abdomen", "Chest"),
    "thorax": ("Spine2", "Chest", "Spine3", "chest", "Thorax", "Neck"),
    "neck": ("Neck", "Neck1", "neck", "NeckTop"),
    "head": ("Head", "head", "HeadTop"),
    "l_shoulder": ("LeftArm", "LeftShoulder", "lShldr", "LShoulder"),
    "l_elbow": ("LeftForeArm", "LeftElbow", "lForeArm", "LElbow"),
    "l_wrist": ("LeftHand", "LeftWrist", "lHand", "LWrist"),
    "r_shoulder": ("RightArm", "RightShoulder", "rShldr", "RShoulder"),
    "r_elbow": ("RightForeArm", "RightElbow", "rForeArm", "RElbow"),
    "r_wrist": ("RightHand", "RightWrist", "rHand", "RWrist"),
}
UNITS_M = (1.0, 0.01, 0.001, 0.0254, 0.0254 / 0.45)
LEG_M = 0.85
CHANNEL_NAMES = tuple(f"{axis}{kind}" for axis in "xyz" for kind in ("position", "rotation"))
MAX_JOINTS = 1000  # exports have 20 to 100
MAX_DEPTH = 256  # nesting of braces
MAX_VALUE = 1e6  # |offset| or |channel value| (file units or degrees)
MIN_FRAME_TIME_S, MAX_FRAME_TIME_S = 1e-4, 10.0  # 10 kHz to 0.1 Hz


def parse_bvh(path: str | Path) -> tuple[list[dict], np.ndarray, float]:
    """-> (joints [{name, parent, offset, channels}], motion [N, n_channels], frame_time_s)."""
    path = str(path)
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise BadSequence(f"{path}: unreadable BVH ({e})") from None
    lines = text.splitlines()
    joints: list[dict] = []
    stack: list[int] = []
    i, n = 0, len(lines)

    def fail(k: int, msg: str):
        raise BadSequence(f"{path}:{k + 1}: {msg}")

    if not lines or lines[0].strip() != "HIERARCHY":
        raise BadSequence(f"{path}:1: not a BVH file (no HIERARCHY)")
    i = 1
    pending_end = False
    while i < n:
        tok = lines[i].split()
        i += 1
        if not tok:
            continue
        head = tok[0]
        try:
            if head in ("ROOT", "JOINT"):
                if len(joints) >= MAX_JOINTS:
                    fail(i - 1, f"more than {MAX_JOINTS} joints")
                joints.append({"name": tok[1], "parent": stack[-1] if stack else -1, "offset": None,
                               "channels": []})
                pending_end = False
            elif head == "End":
                pending_end = True
            elif head == "{":
                if len(stack) >= MAX_DEPTH:
                    fail(i - 1, f"hierarchy nested more than {MAX_DEPTH} levels deep")
                stack.append(-2 if pending_end else len(joints) - 1)
            elif head == "}":
                if not stack:
                    fail(i - 1, "unbalanced '}'")
                stack.pop()
                pending_end = False
            elif head == "OFFSET":
                if not pending_end:
                    if len(tok) != 4:
                        fail(i - 1, "OFFSET needs 3 numbers")
                    offset = np.array([float(v) for v in tok[1:4]])
                    if not (np.isfinite(offset).all() and np.abs(offset).max() <= MAX_VALUE):
                        fail(i - 1, f"OFFSET {' '.join(tok[1:4])} is not finite or absurd (> {MAX_VALUE:g})")
                    joints[-1]["offset"] = offset
            elif head == "CHANNELS":
                count = int(tok[1])
                if len(tok) != 2 + count:
                    fail(i - 1, f"CHANNELS says {count} but lists {len(tok) - 2}")
                unknown = [c for c in tok[2:] if c.lower() not in CHANNEL_NAMES]
                if unknown:
                    fail(i - 1, f"unknown channel {unknown[0][:40]!r} (expected X/Y/Z + position/rotation)")
                joints[-1]["channels"] = tok[2:]
            elif head == "MOTION":
                break
            else:
                fail(i - 1, f"unexpected {lines[i - 1].strip()[:40]!r}")
        except BadSequence:
            raise
        except (ValueError, IndexError):
            fail(i - 1, f"malformed line {lines[i - 1].strip()[:60]!r}")
    if not joints:
        raise BadSequence(f"{path}: no joints in HIERARCHY")
    try:
        frames = int(lines[i].split(":")[1])
        frame_time = float(lines[i + 1].split(":")[1])
    except (IndexError, ValueError):
        fail(i, "expected 'Frames: N' and 'Frame Time: t' after MOTION")
    if frames < 1:
        fail(i, f"Frames: {frames}; a motion needs at least one frame")
    if not MIN_FRAME_TIME_S <= frame_time <= MAX_FRAME_TIME_S:  # also refuses NaN
        fail(i + 1, f"Frame Time: {frame_time} s is not in [{MIN_FRAME_TIME_S}, {MAX_FRAME_TIME_S}] s")
    width = sum(len(j["channels"]) for j in joints)
    rows = []
    for k in range(i + 2, n):
        if not lines[k].strip():
            continue
        try:
            row = [float(v) for v in lines[k].split()]
        except ValueError:
            fail(k, "malformed numbers in a motion line")
        if len(row) != width:
            fail(k, f"motion line has {len(row)} values, the hierarchy has {width} channels")
        if not all(abs(v) <= MAX_VALUE for v in row):  # also refuses NaN
            fail(k, f"motion line has a value that is not finite or absurd (> {MAX_VALUE:g})")
        rows.append(row)
    if len(rows) != frames:
        raise BadSequence(f"{path}: header says {frames} frames, found {len(rows)} (truncated file?)")
    return joints, np.asarray(rows, dtype=np.float64).reshape(len(rows), width), frame_time


def bvh_positions(joints: list[dict], motion: np.ndarray) -> np.ndarray:
    """Forward kinematics: [N, J, 3] global joint positions in file units and axes."""
    n = len(motion)
    glob_r, glob_t = [], []
    col = 0
    for j in joints:
        ch = j["channels"]
        vals = motion[:, col:col + len(ch)]
        col += len(ch)
        t = np.broadcast_to(j["offset"] if j["offset"] is not None else np.zeros(3), (n, 3)).copy()
        r = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
        for k, c in enumerate(ch):
            axis = c[0].lower()
            if c.lower().endswith("position"):
                t[:, "xyz".index(axis)] += vals[:, k]
            elif c.lower().endswith("rotation"):
                ang = np.zeros((n, 3))
                ang[:, "xyz".index(axis)] = np.deg2rad(vals[:, k])
                r = r @ euler_matrix(ang, axis.upper())
        p = j["parent"]
        if p < 0:
            glob_r.append(r)
            glob_t.append(t)
        else:
            glob_r.append(glob_r[p] @ r)
            glob_t.append(glob_t[p] + np.einsum("nij,nj->ni", glob_r[p], t))
    return np.stack(glob_t, axis=1)


def to_h36m17(joints: list[dict], pos: np.ndarray, frame_time: float, fps: float,
              joint_map: dict[str, str]) -> np.ndarray:
    names = [j["name"] for j in joints]
    idx = []
    for h in JOINT_NAMES:
        candidates = (joint_map[h],) if h in joint_map else DEFAULT_JOINT_NAMES[h]
        found = next((names.index(c) for c in candidates if c in names), None)
        if found is None:
            raise BadSequence(f"no BVH joint for H36M joint {h!r} (tried {list(candidates)}; set joint_map)")
        idx.append(found)
    x = pos[:, idx]
    up = int(np.argmax(np.abs(x[0, 10] - x[0, 0])))
    sign = np.sign((x[0, 10] - x[0, 0])[up])
    others = [a for a in range(3) if a != up]
    # right-handed: (a, b, up) with a, b the other axes in cyclic order
    a, b = (up + 1) % 3, (up + 2) % 3
    assert set(others) == {a, b}
    x = np.stack([x[..., a], x[..., b] * sign, x[..., up] * sign], -1)
    leg = np.linalg.norm(x[:, 1] - x[:, 2], axis=-1).mean() + np.linalg.norm(x[:, 2] - x[:, 3], axis=-1).mean()
    if not 0 < leg < np.inf:
        raise BadSequence(f"degenerate skeleton (leg length {leg:.3g})")
    unit = min(UNITS_M, key=lambda u: abs(np.log(leg * u / LEG_M)))
    x = x * unit
    t_in = np.arange(len(x)) * frame_time
    resampled_frames(float(t_in[-1]), fps)
    t_out = np.arange(0.0, t_in[-1] + 1e-9, 1.0 / fps)
    flat = x.reshape(len(x), -1)
    res = np.stack([np.interp(t_out, t_in, flat[:, k]) for k in range(flat.shape[1])], -1)
    res = res.reshape(len(t_out), NUM_JOINTS, 3)
    res[..., 2] += FLOOR_ANKLE_M - np.median(np.minimum(res[:, 3, 2], res[:, 6, 2]))
    return res.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, fps: float, joint_map: tuple) -> np.ndarray:
    joints, motion, ft = parse_bvh(path)
    return to_h36m17(joints, bvh_positions(joints, motion), ft, fps, dict(joint_map))


class BVHSource(Source):
    name = "bvh"

    def plan(self, cfg: PreprocessConfig) -> Plan:
        if not cfg.input or not Path(cfg.input).exists():
            raise PipelineError(f"--input must be a .bvh file or a folder of them, got {cfg.input!r}")
        p = Path(cfg.input)
        files = [p] if p.is_file() else sorted(p.rglob("*.bvh"))
        if not files:
            raise PipelineError(f"{cfg.input}: no .bvh files")
        plan = Plan(inputs=[str(f) for f in files], info={"synthetic": False, "fps": cfg.fps})
        for f in files:
            for c in range(cfg.n_cameras):
                plan.keys.append({"subject": f.parent.name, "action": f.stem, "camera": f"virt{c}",
                                  "camera_index": c, "file": str(f), "frames": None})
        return plan

    def load(self, key: SeqKey, cfg: PreprocessConfig) -> RawSequence:
        world = _load(key["file"], os.stat(key["file"]).st_mtime_ns, cfg.fps, tuple(sorted(cfg.joint_map.items())))
        cam = virtual_cameras(world, cfg)[key["camera_index"]]
        return RawSequence(source=self.name, subject=key["subject"], action=key["action"], camera=cam,
                           pose_3d=world, file=key["file"])
