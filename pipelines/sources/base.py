"""The source interface: `plan` lists sequences cheaply, `load` reads one (in whichever process runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from h2ot.camera import Camera, camera_ring
from pipelines.config import PreprocessConfig
from pipelines.records import RawSequence, SeqKey


@dataclass
class Plan:
    """keys: sequences to load, in a stable order; quarantine: entries refused while planning (each counts as
    one sequence in); inputs: files whose content decides the output; warnings: shown and kept in the manifest."""

    keys: list[SeqKey] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Source:
    name = "base"
    default_test_subjects: tuple[str, ...] = ()
    default_train_subjects: tuple[str, ...] | None = None  # None: every subject that is not a test subject

    def plan(self, cfg: PreprocessConfig) -> Plan:
        raise NotImplementedError

    def load(self, key: SeqKey, cfg: PreprocessConfig) -> RawSequence:
        raise NotImplementedError


def virtual_cameras(pose_world: np.ndarray, cfg: PreprocessConfig) -> list[Camera]:
    """The configured ring of virtual cameras around a sequence: centred on the middle of the pelvis path
    (world metres, z up), at `camera_height_m`, looking at the mean pelvis height, `camera_radius_m` plus the
    path's half diagonal away (so a subject crossing the room stays in the images)."""
    root = pose_world[:, 0]
    centre = (root.min(0) + root.max(0)) / 2
    half_diagonal = float(np.linalg.norm(root.max(0)[:2] - root.min(0)[:2]) / 2)
    target = np.array([centre[0], centre[1], float(np.mean(root[:, 2]))])
    ring = camera_ring(target, n=cfg.n_cameras, radius_m=cfg.camera_radius_m + half_diagonal,
                       height_m=cfg.camera_height_m)
    return ring
