"""The shard format: Parquet files of sliding windows, and their manifest. Plain pyarrow, no Ray.

Layout of a shard folder `OUT`:

    OUT/manifest.json          schema_version, config, sources (+ content hashes), counts, bytes, quarantine,
                               content_hash (of every shard file), ...
    OUT/train/part-GGGGG-KKK.parquet
    OUT/test/part-GGGGG-KKK.parquet

One row per window of T frames:

    pose_2d  [T, 17, 2] float32  normalised screen coordinates (VideoPose3D: u/w*2-1, v/w*2-h/w)
    conf_2d  [T, 17]    float32  1 where 2D is projected from 3D, detector score (or noise model) otherwise
    pose_3d  [T, 17, 3] float32  metres, camera frame, root-relative (joint 0 is 0)
    valid    [T]        uint8    1 for real frames, 0 for edge padding (never count padding in metrics)
    subject, action, camera, source: string;  start: int64 = first frame of the window in its sequence
                                              (negative when the window begins in the left padding)

Tensor columns are `arrow.fixed_shape_tensor` (Arrow's canonical extension type): plain pyarrow reads them
(`read_split`) and `ray.data.read_parquet` gives tensors (`iter_torch_batches`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from h2ot.skeleton import NUM_JOINTS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
TENSOR_COLUMNS = ("pose_2d", "conf_2d", "pose_3d", "valid")
STRING_COLUMNS = ("subject", "action", "camera", "source")
COLUMNS = TENSOR_COLUMNS + STRING_COLUMNS + ("start",)


def tensor_shapes(frames: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-row shape and dtype of each tensor column for windows of `frames` frames."""
    return {
        "pose_2d": ((frames, NUM_JOINTS, 2), np.float32),
        "conf_2d": ((frames, NUM_JOINTS), np.float32),
        "pose_3d": ((frames, NUM_JOINTS, 3), np.float32),
        "valid": ((frames,), np.uint8),
    }


# The Parquet writer settings, shared by every path that writes shards (Ray Data and single-process):
# zstd without dictionary encoding, and BYTE_STREAM_SPLIT for the float columns: measured on synthetic poses,
# 0.78x the raw float32 bytes, where pyarrow's defaults (dictionary-encoded floats) give 1.31x.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "column_encoding": {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in ("pose_2d", "conf_2d", "pose_3d")},
    "write_statistics": ["subject", "action", "camera", "source", "start"],
}


def windows_table(columns: dict[str, Any]) -> pa.Table:
    """Columns (tensors as numpy [N, ...], strings as lists/arrays, start as int) -> a shard table."""
    n = len(columns["start"])
    arrays = {}
    for name in TENSOR_COLUMNS:
        x = np.ascontiguousarray(columns[name])
        if len(x) != n:
            raise ValueError(f"column {name} has {len(x)} rows, start has {n}")
        arrays[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    for name in STRING_COLUMNS:
        arrays[name] = pa.array(list(columns[name]), pa.string())
    arrays["start"] = pa.array(np.asarray(columns["start"], dtype=np.int64), pa.int64())
    return pa.table({name: arrays[name] for name in COLUMNS})


def write_shard(table: pa.Table, path: str | Path) -> int:
    """Write one shard with PARQUET_WRITE_OPTIONS; returns its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=max(1, min(len(table), 256)), **PARQUET_WRITE_OPTIONS)
    return path.stat().st_size


def _column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    if isinstance(col.type, pa.FixedShapeTensorType):
        if col.num_chunks == 0:
            return np.zeros((0, *col.type.shape), dtype=col.type.value_type.to_pandas_dtype())
        return np.concatenate([c.to_numpy_ndarray() for c in col.chunks]) if col.num_chunks > 1 \
            else col.chunk(0).to_numpy_ndarray()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.array(col.to_pylist(), dtype=object)
    return col.to_numpy()


def split_files(shard_dir: str | Path, split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted((Path(shard_dir) / split).glob("*.parquet"))


def read_split(shard_dir: str | Path, split: str, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """All rows of `OUT/<split>/*.parquet` as numpy: tensors [N, ...], strings as object arrays, start int64.

    Plain pyarrow; rows in file order. A split with no files gives empty arrays.
    """
    load_manifest(shard_dir)  # refuse folders that are not complete
    files = split_files(shard_dir, split)
    columns = list(columns or COLUMNS)
    if not files:
        frames = int(load_manifest(shard_dir)["frames"])
        shapes = tensor_shapes(frames)
        return {c: (np.zeros((0, *shapes[c][0]), shapes[c][1]) if c in shapes
                    else np.zeros(0, np.int64) if c == "start" else np.zeros(0, object)) for c in columns}
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    return {c: _column_to_numpy(table[c]) for c in columns}


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete shard folder; FileNotFoundError if there is none (or a partial build),
    ValueError if it is not a shard manifest this code reads (`check_manifest`)."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no {MANIFEST} (not a shard folder, or an interrupted build); "
                                "run `h2ot preprocess --out` on it")
    try:
        manifest = read_manifest_file(path)
    except ValueError as e:
        raise ValueError(f"{e}; rebuild the shards") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')}, this code reads "
                         f"{SCHEMA_VERSION}; rebuild the shards")
    return manifest


def read_manifest_file(path: str | Path, written_by_builder: bool = False) -> dict[str, Any]:
    """A manifest file, parsed and checked (`check_manifest`); ValueError naming the file otherwise."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable manifest ({type(e).__name__}: {str(e)[:120]})") from None
    problem = check_manifest(manifest, written_by_builder)
    if problem:
        raise ValueError(f"{path}: not a shard manifest ({problem})")
    return manifest


def safe_shard_path(rel: object) -> bool:
    """True for `train/<name>.parquet` or `test/<name>.parquet`: no other folder, no `..`, not absolute."""
    if not isinstance(rel, str) or "\\" in rel or "\0" in rel:
        return False
    parts = rel.split("/")
    return (len(parts) == 2 and parts[0] in SPLITS and parts[1] not in ("", ".", "..")
            and parts[1].endswith(".parquet"))


def check_manifest(manifest: object, written_by_builder: bool = False) -> str | None:
    """None if `manifest` is a JSON object with schema_version and files {train|test/<name>.parquet: {bytes,
    ...}}, else what is wrong. `written_by_builder` also requires what `build_shards` writes: build_key, and a
    sha256 per file (the proof the builder asks before it replaces a folder)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("schema_version"), int):
        return "no schema_version"
    if written_by_builder and not isinstance(manifest.get("build_key"), str):
        return "no build_key"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "no files table"
    for rel, info in files.items():
        if not safe_shard_path(rel):
            return f"file path {str(rel)[:80]!r} is not inside train/ or test/"
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int)):
            return f"file entry {rel!r} has no size"
        if written_by_builder and not isinstance(info.get("sha256"), str):
            return f"file entry {rel!r} has no sha256"
    return None


def manifest_hash(shard_dir: str | Path) -> str:
    """The content hash of a shard folder (sha256 over every shard file's name and bytes), from its manifest.

    Stable across rebuilds of the same inputs and config, whichever path (Ray or single-process) built it.
    """
    return str(load_manifest(shard_dir)["content_hash"])


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(files: dict[str, str]) -> str:
    """sha256 over sorted (relative path, file sha256) pairs."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def verify_files(shard_dir: str | Path, manifest: dict[str, Any]) -> str | None:
    """None if every file the manifest lists exists with its size and content hash, else what is wrong."""
    problem = check_manifest(manifest, written_by_builder=True)
    if problem:
        return problem
    for rel, info in manifest["files"].items():
        p = Path(shard_dir) / rel
        if not p.is_file() or p.is_symlink():
            return f"missing shard {rel}"
        if p.stat().st_size != info["bytes"]:
            return f"shard {rel} has {p.stat().st_size} bytes, manifest says {info['bytes']}"
        if file_sha256(p) != info["sha256"]:
            return f"shard {rel} does not match its sha256 in the manifest (changed on disk)"
    return None
