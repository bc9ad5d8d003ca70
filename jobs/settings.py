"""The run settings of `h2ot train` (optimizer, loss weights, workers, run names) and the `TrainConfig` that
holds them beside the model config; the `train` config kind.

The model config, the YAML loader and the `base:`/`--set` rules are `h2ot.config`'s; this module registers the
kind `train` there, so load train YAML files through `load_train_config` (or import this module first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h2ot.config import ModelConfig, config_from_dict, load_config, register_config_kind


@dataclass
class LossConfig:
    """The paper's seq2seq loss: L = wMPJPE + tc_weight * TC + velocity_weight * MPJVE."""

    tc_weight: float = 0.5
    velocity_weight: float = 2.0


@dataclass
class OptimConfig:
    epochs: int = 10
    steps_per_epoch: int | None = None  # cap, so budgets are comparable and schedulers get points
    batch_size: int = 16  # clips per worker
    lr: float = 5e-4
    lr_schedule: str = "exponential"  # "exponential": x lr_decay every epoch; "cosine": warm-up, then cosine to 0
    lr_decay: float = 0.99  # exponential: multiplied in every epoch
    warmup_steps: int = 0  # cosine: linear warm-up over these steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    flip_augment: bool = True
    test_flip: bool = True
    amp: bool = True  # only on GPU
    seed: int = 0
    eval_batch_size: int = 64
    eval_max_windows: int | None = None  # cap on test windows per evaluation (None: all)


@dataclass
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool | None = None  # None: use a GPU when the cluster has one
    # < 1 leaves CPU for Ray Data: with every CPU held by Train workers, its read tasks wait and the run stalls
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0
    torch_threads: int = 1


@dataclass
class RunSettings:
    name: str | None = None  # default: derived from backbone, schedule and data
    experiment: str = "h2ot"
    storage_path: str | None = None  # default: RUN_DIR/ray; a shared path (NFS, s3://) on a cluster
    max_failures: int = 1
    # Worker-group starts that time out (no room for the workers within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
    # 60 s) before the run fails with Ray Train's WorkerGroupStartupTimeoutError; -1 (Ray's default) waits for
    # the capacity to come back however long it takes (the job stays RUNNING), e.g. after losing a node.
    max_startup_failures: int = -1
    num_to_keep: int = 2


@dataclass
class TrainConfig:
    kind: str = "train"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)


register_config_kind("train", TrainConfig)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A train YAML file (+ its base files, + dotted `--set` overrides) -> TrainConfig; errors name the file and key."""
    return load_config(path, overrides, kind="train")


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a plain dict (`to_dict` of one, as handed to Ray), every key checked."""
    return config_from_dict(data, "train")
