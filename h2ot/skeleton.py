"""The Human3.6M 17-joint skeleton (VideoPose3D order), its 32->17 selection and left/right flip.

Joint order: 0 pelvis, 1 r_hip, 2 r_knee, 3 r_ankle, 4 l_hip, 5 l_knee, 6 l_ankle, 7 spine, 8 thorax,
9 neck/nose, 10 head, 11 l_shoulder, 12 l_elbow, 13 l_wrist, 14 r_shoulder, 15 r_elbow, 16 r_wrist.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NUM_JOINTS = 17
JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine", "thorax",
    "neck", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist",
)
PARENTS: tuple[int, ...] = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
LEFT_JOINTS: tuple[int, ...] = (4, 5, 6, 11, 12, 13)
RIGHT_JOINTS: tuple[int, ...] = (1, 2, 3, 14, 15, 16)
ROOT_JOINT = 0

# The 17 joints VideoPose3D keeps of the 32-joint Human3.6M motion-capture skeleton.
H36M32_TO_17: tuple[int, ...] = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)

# Per-joint loss weights of MixSTE/HoT training (H36M-17 order): extremities count more.
JOINT_LOSS_WEIGHTS: tuple[float, ...] = (
    1.0, 1.0, 2.5, 2.5, 1.0, 2.5, 2.5, 1.0, 1.0, 1.0, 1.5, 1.5, 4.0, 4.0, 1.5, 4.0, 4.0,
)


def _flip_permutation() -> tuple[int, ...]:
    perm = list(range(NUM_JOINTS))
    for left, right in zip(LEFT_JOINTS, RIGHT_JOINTS):
        perm[left], perm[right] = right, left
    return tuple(perm)


FLIP_PERMUTATION: tuple[int, ...] = _flip_permutation()
BONES: tuple[tuple[int, int], ...] = tuple((j, p) for j, p in enumerate(PARENTS) if p >= 0)


def flip_pose(pose: Any) -> Any:
    """Mirror a pose left<->right: negate x and swap left/right joints.

    pose: [..., J=17, C] numpy array or torch tensor (C >= 1; the first channel is x). Works for 2D
    (x, y[, conf]) and 3D; flipping twice
    returns the input.
    """
    if pose.shape[-2] != NUM_JOINTS:
        raise ValueError(f"flip_pose expects {NUM_JOINTS} joints on axis -2, got shape {tuple(pose.shape)}")
    flipped = pose[..., list(FLIP_PERMUTATION), :]
    flipped = flipped.clone() if hasattr(flipped, "clone") else flipped.copy()
    flipped[..., 0] = -flipped[..., 0]
    return flipped


def bone_lengths(pose_3d: np.ndarray) -> np.ndarray:
    """Bone lengths of [..., 17, 3] poses, in the poses' units, ordered as `BONES`: [..., 16]."""
    child = np.array([b[0] for b in BONES])
    parent = np.array([b[1] for b in BONES])
    return np.linalg.norm(pose_3d[..., child, :] - pose_3d[..., parent, :], axis=-1)
