"""`PreprocessConfig`: everything that decides the content of a shard folder (kind `preprocess`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from h2ot.config import ConfigError, register_config_kind
from h2ot.registry import Registry

MAX_FPS = 1000.0
# Where each source's reader lives ("module:class"; pipelines.build imports it on first use).
SOURCES: Registry[str] = Registry("source", key="source")
SOURCES.register("h36m", "pipelines.sources.h36m:H36MSource")
SOURCES.register("cmu", "pipelines.sources.cmu:CMUSource")
SOURCES.register("bvh", "pipelines.sources.bvh:BVHSource")
SOURCES.register("3dhp", "pipelines.sources.mpi3dhp:MPI3DHPSource")
SOURCES.register("synthetic", "pipelines.sources.synthetic:SyntheticSource")

# Sources that read several input files (a list, a folder or a glob of them), each planned on its own.
MULTI_FILE_SOURCES = ("h36m",)
# Fields that change how a build runs but not what it writes (left out of the idempotency key).
EXECUTION_FIELDS = ("kind", "out", "strict", "use_ray", "num_cpus", "progress")


@dataclass
class PreprocessConfig:
    """Options of `h2ot preprocess` / `pipelines.build_shards`. Units in names; frames at 50 fps."""

    kind: str = "preprocess"
    source: str = "synthetic"
    # File or folder of the raw data (not needed for synthetic). h36m also takes several VideoPose3D files: a list,
    # a folder (its data_3d_*.npz) or a glob; each file's sequences are distinct sequences.
    input: str | list[str] | None = None
    input_2d: str | None = None  # h36m: data_2d_h36m_<detector>.npz (else 2D is projected from 3D)
    out: str | None = None
    frames: int = 243  # window length T
    stride: int = 81  # training windows
    test_stride: int | None = None  # test windows; None = frames (each test frame counted once)
    train_subjects: list[str] | None = None  # None: every subject not in test_subjects
    test_subjects: list[str] | None = None  # None: the source's default (h36m: S9 S11)
    min_frames: int = 10  # shorter sequences are quarantined as too short
    rows_per_shard: int = 1024  # windows per Parquet file (about)
    noise_px: float = 0.0  # detector-like Gaussian 2D noise, pixels (std); 0 = clean projections
    dropout: float = 0.0  # probability that a joint's 2D is dropped (confidence 0, outlier position)
    seed: int = 0
    fps: float = 50.0  # output frame rate of resampled sources (cmu 120 fps, bvh)
    n_cameras: int = 4  # virtual cameras (cmu, bvh, synthetic)
    camera_radius_m: float = 5.0
    camera_height_m: float = 1.5
    joint_map: dict[str, str] = field(default_factory=dict)  # bvh: H36M joint name -> BVH joint name
    synthetic_subjects: int = 5
    synthetic_frames: int = 600
    strict: bool = False
    use_ray: bool = True
    num_cpus: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        SOURCES.get(self.source)
        self._check_input()
        for name in ("frames", "stride", "min_frames", "rows_per_shard", "n_cameras", "synthetic_subjects",
                     "synthetic_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.test_stride is not None and self.test_stride < 1:
            raise ConfigError(f"test_stride: must be >= 1, got {self.test_stride}")
        if self.noise_px < 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"noise_px must be >= 0 and dropout in [0, 1), got {self.noise_px}, {self.dropout}")
        if not 0 < self.fps <= MAX_FPS:
            raise ConfigError(f"fps: must be in (0, {MAX_FPS}], got {self.fps}")

    def _check_input(self) -> None:
        """A list of one file is that file (the same build key as before lists were allowed)."""
        if not isinstance(self.input, (list, tuple)):
            return
        if not self.input or not all(isinstance(p, str) and p for p in self.input):
            raise ConfigError(f"input: expected a file, a folder, a glob or a list of files, got {self.input!r}")
        if len(self.input) == 1:
            self.input = self.input[0]
            return
        self.input = list(self.input)
        if self.source not in MULTI_FILE_SOURCES:
            raise ConfigError(f"input: source {self.source} reads one file or folder, got a list of "
                              f"{len(self.input)}; several files work for {', '.join(MULTI_FILE_SOURCES)}")

    @property
    def effective_test_stride(self) -> int:
        return self.test_stride or self.frames

    def content_dict(self) -> dict[str, Any]:
        """The fields that decide the shards' content (the idempotency key), as plain data."""
        d = dataclasses.asdict(self)
        for name in EXECUTION_FIELDS:
            d.pop(name, None)
        return d


register_config_kind("preprocess", PreprocessConfig)
