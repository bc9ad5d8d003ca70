"""The source interface: `plan` lists sequences cheaply, `load` reads one (in whichever process runs it).

A source that reads several input files (h36m) lists them with `units`: each file is then planned on its own, in
the task that processes it, so that no process has to parse every input before the work starts. `inputs` names
the files whose bytes decide the output (the builder hashes them for its idempotency key).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from h2ot.camera import Camera, camera_ring
from pipelines.config import PreprocessConfig
from pipelines.records import BadSequence, PipelineError, PreparedSequence, RawSequence, SeqKey, prepare_sequence

log = logging.getLogger(__name__)

# What a reader's own checks may have missed in a crafted file. A reader validates what it reads and raises
# BadSequence (one sequence) or PipelineError (the whole input); anything of these types that still escapes is
# turned into the same two outcomes below, so that one odd sequence never stops a build with a traceback.
READER_SLIPS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, AssertionError,
                RecursionError, MemoryError, UnicodeError)


@dataclass
class Plan:
    """keys: sequences to load, in a stable order; quarantine: entries refused while planning (each counts as
    one sequence in); inputs: files whose content decides the output; warnings: shown and kept in the manifest;
    skipped: sequences of subjects in neither split, with the reason (each counts as one sequence in)."""

    keys: list[SeqKey] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # in neither split (set by the builder)


def plan_checked(source: Source, cfg: PreprocessConfig) -> Plan:
    """`source.plan(cfg)`; an unexpected exception becomes a PipelineError naming the input."""
    try:
        return source.plan(cfg)
    except PipelineError:
        raise
    except READER_SLIPS as e:
        log.debug("planning %s input %s failed", source.name, cfg.input, exc_info=True)
        raise PipelineError(f"{cfg.input}: not readable as {source.name} input ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None


def read_sequence(source: Source, key: SeqKey, cfg: PreprocessConfig) -> PreparedSequence:
    """Load and prepare one sequence; BadSequence (with the reason) for anything wrong with it.

    PipelineError (a whole input unreadable) passes through; an unexpected exception becomes BadSequence.
    """
    try:
        raw = source.load(key, cfg)
        return prepare_sequence(raw, cfg.min_frames, cfg.noise_px, cfg.dropout, cfg.seed)
    except (BadSequence, PipelineError):
        raise
    except READER_SLIPS as e:
        log.warning("%s: unexpected %s while reading a sequence; quarantined", key.get("file"), type(e).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        raise BadSequence(f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None


class Source:
    name = "base"
    default_test_subjects: tuple[str, ...] = ()
    default_train_subjects: tuple[str, ...] | None = None  # None: every subject that is not a test subject

    def plan(self, cfg: PreprocessConfig) -> Plan:
        raise NotImplementedError

    def units(self, cfg: PreprocessConfig) -> list[str] | None:
        """The input files this source plans one at a time (each with `cfg.input` set to it), found without
        reading them; None: the whole input is planned at once."""
        return None

    def inputs(self, cfg: PreprocessConfig) -> list[str]:
        """The files whose bytes decide the output. By default what `plan` lists; a source that can name them
        without parsing them overrides this (the builder calls it before any work starts)."""
        return plan_checked(self, cfg).inputs

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
