"""Tiny synthetic shard folders for the training / evaluation tests (same schema as pipelines.shards).

Poses move smoothly; 2D is a pinhole projection of the 3D joints, so a model can learn the mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.shards import SCHEMA_VERSION, content_hash, file_sha256, windows_table, write_shard

ACTIONS = ("Walking", "Eating")


def _windows(rng: np.random.Generator, n: int, frames: int, subject: str) -> dict:
    base = rng.normal(0, 0.25, (n, 1, 17, 3)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 17, 3)).astype(np.float32)
    t = np.arange(frames, dtype=np.float32)[None, :, None, None]
    pose_3d = base + 0.1 * np.sin(0.2 * t + phase)
    pose_3d = pose_3d - pose_3d[:, :, :1]  # root-relative
    depth = 5.0 + pose_3d[..., 2:3]
    pose_2d = (pose_3d[..., :2] / depth).astype(np.float32)
    valid = np.ones((n, frames), np.uint8)
    valid[0, :3] = 0  # some edge padding
    return {
        "pose_2d": pose_2d, "conf_2d": np.ones((n, frames, 17), np.float32), "pose_3d": pose_3d.astype(np.float32),
        "valid": valid, "subject": [subject] * n, "action": [ACTIONS[i % 2] for i in range(n)],
        "camera": ["c0"] * n, "source": ["synthetic"] * n, "start": np.arange(n) * frames,
    }


def write_tiny_shards(out: str | Path, frames: int = 27, n_train: int = 256, n_test: int = 48,
                      seed: int = 0, files_per_split: int = 2) -> Path:
    """A complete shard folder (manifest.json, train/, test/) of synthetic windows."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    hashes = {}
    files = {}
    for split, n, subject in (("train", n_train, "S1"), ("test", n_test, "S9")):
        cols = _windows(rng, n, frames, subject)
        bounds = np.linspace(0, n, files_per_split + 1).astype(int)
        for k in range(files_per_split):
            part = {key: v[bounds[k]:bounds[k + 1]] for key, v in cols.items()}
            rel = f"{split}/part-{k:05d}-000.parquet"
            size = write_shard(windows_table(part), out / rel)
            hashes[rel] = file_sha256(out / rel)
            files[rel] = {"bytes": size, "rows": int(bounds[k + 1] - bounds[k])}
    manifest = {"schema_version": SCHEMA_VERSION, "frames": frames, "files": files,
                "content_hash": content_hash(hashes), "counts": {"train": n_train, "test": n_test}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
