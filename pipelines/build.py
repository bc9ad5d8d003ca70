"""Build a shard folder: plan sequences, process them in groups (Ray Data or one process), write atomically.

The input is cut into units (one per file for a source that reads several, h36m; else the whole input). Each
unit is planned where it is processed, its sequences packed into groups (`make_groups`), and both execution paths
call the same `process_group` (load -> `prepare_sequence` -> windows -> `write_shard`) on the same groups, so
they write byte-identical files; only the scheduling differs:

- `use_ray=True`: a Ray Data pipeline, `from_items(chunks).map(run_unit)`: one task per chunk of a unit's
  groups, about two per CPU; each task parses its file itself (the driver reads no input);
- `use_ray=False`: a plain loop in this process (fast tests, and the benchmark's baseline).

Shards are `<split>/part-<group>-<k>.parquet` for a single unit (as before several files were read), and
`<split>/part-<unit>-<group>-<k>.parquet` for several (units numbered in path order).

Idempotent and atomic: the build key hashes the content config, the schema and the inputs' bytes (hashed in
threads while the build runs); an unchanged key with intact files (their sha256 verified) is a no-op. A build
writes `.<out>.tmp-<pid>-<id>/`, checks that sequences in = written + quarantined + skipped (subjects in neither
split, listed with the reason), writes the manifest last and renames the folder into place.

Safe with the user's files: a folder is replaced only if the builder wrote it (its manifest schema and build
key, nothing in it but that manifest and the train/ and test/ files it lists); otherwise the build stops with an
error naming the foreign files and changes nothing. Builds of one `--out` are serialised by `.<out>.lock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import SOURCES, PreprocessConfig
from pipelines.records import BadSequence, PipelineError, SeqKey, describe
from pipelines.safe_npz import keep_npz_cached
from pipelines.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    content_hash,
    file_sha256,
    read_manifest_file,
    verify_files,
    windows_table,
    write_shard,
)
from pipelines.sources.base import Plan, Source, plan_checked, read_sequence
from pipelines.windows import num_windows, valid_mask, window_starts

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2  # bump when the processing changes what is written for the same inputs and config
_SOURCES: dict[str, Source] = {}


def get_source(name: str) -> Source:
    """The (per-process, cached) source object of `name`."""
    if name not in _SOURCES:
        module, cls = SOURCES.get(name).split(":")
        _SOURCES[name] = getattr(importlib.import_module(module), cls)()
    return _SOURCES[name]


# ------------------------------------------------------------------------------------------ planning
def split_of(subject: str, cfg: PreprocessConfig, source: Source) -> str | None:
    """'test' for test subjects, 'train' for training subjects (all others by default), None: not used."""
    test, train = subject_lists(cfg, source)
    if subject in test:
        return "test"
    if train is None or subject in train:
        return "train"
    return None


def subject_lists(cfg: PreprocessConfig, source: Source) -> tuple[list[str], list[str] | None]:
    """(test subjects, train subjects or None for 'all others'): the config's, else the source's defaults."""
    test = cfg.test_subjects if cfg.test_subjects is not None else list(source.default_test_subjects)
    train = cfg.train_subjects
    if train is None and source.default_train_subjects is not None:
        train = [s for s in source.default_train_subjects if s not in test]
    return list(test), train


def assign_splits(plan: Plan, cfg: PreprocessConfig, source: Source) -> list[str]:
    """Set key['split'] on every planned key; a subject in neither split moves to `plan.skipped` with its
    reason (nothing disappears without a word). Returns warnings (wanted subjects missing from this plan)."""
    present = subjects_present(plan)
    kept = []
    for key in plan.keys:
        split = split_of(key["subject"], cfg, source)
        if split is None:
            plan.skipped.append({**{k: key.get(k) for k in ("file", "subject", "action", "camera")},
                                 "reason": _not_in_a_split(key["subject"])})
        else:
            kept.append({**key, "split": split})
    quarantine = []
    for entry in plan.quarantine:
        entry.setdefault("split", split_of(str(entry.get("subject")), cfg, source))
        if entry["split"] is None and entry.get("subject") is not None:
            plan.skipped.append({**entry, "reason": f"{_not_in_a_split(entry['subject'])} (and: {entry['reason']})"})
        else:
            quarantine.append(entry)
    plan.quarantine = quarantine
    check_subject_lists(cfg, source)
    plan.keys = kept
    return missing_subjects(present, cfg, source)


def subjects_present(plan: Plan) -> set[str]:
    """The subjects a plan holds (planned or quarantined), as the split lists name them."""
    return {str(k["subject"]) for k in plan.keys} | {str(q.get("subject")) for q in plan.quarantine}


def missing_subjects(present: set[str], cfg: PreprocessConfig, source: Source) -> list[str]:
    """A warning for each subject of the split lists that the input does not hold."""
    test, train = subject_lists(cfg, source)
    return [f"{name} subject {subject} is not in the input; skipped"
            for name, wanted in (("test", test), ("train", train or [])) for subject in wanted
            if subject not in present]


def check_subject_lists(cfg: PreprocessConfig, source: Source) -> None:
    test, train = subject_lists(cfg, source)
    overlap = set(test) & set(train or [])
    if overlap:
        raise PipelineError(f"subjects {sorted(overlap)} are in both train_subjects and test_subjects")

def _not_in_a_split(subject: object) -> str:
    return f"subject {subject} is in neither the train nor the test subjects"


def make_groups(keys: list[SeqKey], cfg: PreprocessConfig) -> list[list[SeqKey]]:
    """Consecutive keys packed until their estimated windows reach `rows_per_shard` (one task per group)."""
    groups: list[list[SeqKey]] = []
    current: list[SeqKey] = []
    rows = 0
    for key in keys:
        stride = cfg.stride if key["split"] == "train" else cfg.effective_test_stride
        rows += num_windows(max(1, int(key.get("frames") or cfg.frames)), cfg.frames, stride)
        current.append(key)
        if rows >= cfg.rows_per_shard:
            groups.append(current)
            current, rows = [], 0
    if current:
        groups.append(current)
    return groups


# ------------------------------------------------------------------------------------------ processing
def sequence_windows(prep: Any, frames: int, stride: int) -> dict[str, Any]:
    """Windows of one prepared sequence: tensor columns [n, frames, ...] plus string columns and start."""
    return _windows([(prep, window_starts(len(prep.pose_3d), frames, stride))], frames)


def _windows(parts: list[tuple[Any, np.ndarray]], frames: int) -> dict[str, Any]:
    """The windows of several prepared sequences (each with its window starts) as one set of columns.

    Each tensor column is allocated once and the windows are gathered straight into it (no per-sequence arrays
    to concatenate: that copy was a seventh of a group's time on Human3.6M)."""
    total = sum(len(starts) for _, starts in parts)
    first = parts[0][0]
    out: dict[str, Any] = {name: np.empty((total, frames, *getattr(first, name).shape[1:]), getattr(first, name).dtype)
                           for name in ("pose_2d", "conf_2d", "pose_3d")}
    out["valid"] = np.empty((total, frames), np.uint8)
    lo = 0
    for prep, starts in parts:
        length, hi = len(prep.pose_3d), lo + len(starts)
        idx = np.clip(starts[:, None] + np.arange(frames)[None, :], 0, length - 1)
        for name in ("pose_2d", "conf_2d", "pose_3d"):
            np.take(getattr(prep, name), idx, axis=0, out=out[name][lo:hi], mode="clip")
        out["valid"][lo:hi] = prep.valid[idx] * valid_mask(length, starts, frames)
        lo = hi
    for name in ("subject", "action", "camera", "source"):
        out[name] = [getattr(prep, name) for prep, starts in parts for _ in range(len(starts))]
    out["start"] = np.concatenate([starts for _, starts in parts])
    return out


def process_group(group_id: int, keys: list[SeqKey], cfg_dict: dict[str, Any], out_dir: str,
                  prefix: str = "part") -> dict[str, Any]:
    """THE unit of work of both paths: load, validate, prepare and window each sequence of a group, and
    write its shards `out_dir/<split>/<prefix>-<group>-<k>.parquet` (at most rows_per_shard rows each).

    Returns {"group", "sequences": [...], "quarantine": [...], "files": {relpath: {bytes, rows, sha256}}}.
    """
    cfg = PreprocessConfig(**cfg_dict)
    source = get_source(cfg.source)
    per_split: dict[str, list[tuple[Any, np.ndarray]]] = defaultdict(list)
    sequences, quarantine = [], []
    for key in keys:
        ident = {k: key.get(k) for k in ("file", "subject", "action", "camera", "split")}
        try:
            prep = read_sequence(source, key, cfg)
        except BadSequence as e:
            if cfg.strict:
                raise PipelineError(f"{describe(key)}: {e} (--strict)") from None
            quarantine.append({**ident, "reason": str(e)})
            continue
        stride = cfg.stride if key["split"] == "train" else cfg.effective_test_stride
        starts = window_starts(len(prep.pose_3d), cfg.frames, stride)
        per_split[key["split"]].append((prep, starts))
        sequences.append({**ident, "frames": int(len(prep.pose_3d)), "windows": int(len(starts)),
                          "valid_frames": int(prep.valid.sum()), "reprojection_px": prep.reprojection_px})
    files = {}
    for split in SPLITS:
        parts = per_split.pop(split, None)
        if not parts:
            continue
        columns = _windows(parts, cfg.frames)  # once per split; each shard takes a slice (views, no copy)
        del parts
        total = len(columns["start"])
        for k, lo in enumerate(range(0, total, cfg.rows_per_shard)):
            rel = f"{split}/{prefix}-{group_id:05d}-{k:03d}.parquet"
            table = windows_table({name: col[lo:lo + cfg.rows_per_shard] for name, col in columns.items()})
            size = write_shard(table, Path(out_dir) / rel)
            files[rel] = {"bytes": size, "rows": table.num_rows, "sha256": file_sha256(Path(out_dir) / rel)}
    return {"group": group_id, "sequences": sequences, "quarantine": quarantine, "files": files}


# ------------------------------------------------------------------------------------------ units of work
# A unit is a part of the input planned on its own: one file of a multi-file source (h36m), else the whole input.
# Both paths plan a unit where they process it, cut its sequences into the same groups (`make_groups`) and name
# the shards after (unit, group), so their files are identical. The Ray path splits a unit's groups into chunks,
# one task each, so that a file is parsed by as few workers as keep the CPUs busy.
CHUNKS_PER_CPU = 2  # tasks per CPU the Ray path aims at: few enough that a worker rarely parses a file twice
ALIKE = 1.25  # units whose sizes differ by less than this factor take about as long each


def unit_configs(cfg: PreprocessConfig, source: Source) -> list[PreprocessConfig]:
    """One config per unit: `cfg` with `input` set to each of the source's files, or `cfg` itself."""
    files = source.units(cfg)
    if files is None or (len(files) == 1 and files[0] == cfg.input):
        return [cfg]
    return [dataclasses.replace(cfg, input=f) for f in files]


def shard_prefix(unit: int, units: int) -> str:
    """'part' for a single unit (the names of a one-file build), 'part-<unit>' for several."""
    return "part" if units == 1 else f"part-{unit:03d}"


def plan_unit(cfg: PreprocessConfig, source: Source) -> tuple[Plan, set[str]]:
    """The plan of one unit with its splits assigned, and the subjects it holds."""
    plan = plan_checked(source, cfg)
    present = subjects_present(plan)
    assign_splits(plan, cfg, source)  # its missing-subject warnings are the builder's, over every unit
    return plan, present


def run_unit(unit: int, units: int, cfg_dict: dict[str, Any], out_dir: str, chunk: int = 0, chunks: int = 1,
             bar: Any = None) -> dict[str, Any]:
    """Plan a unit and process its groups of `chunk` (of `chunks`, contiguous). Chunk 0 also reports the unit's
    plan: {"unit", "groups": [process_group results], "plan": {...} or None, "plan_s"}."""
    t0 = time.perf_counter()
    cfg = PreprocessConfig(**cfg_dict)
    source = get_source(cfg.source)
    plan, present = plan_unit(cfg, source)
    keep_npz_cached(plan.inputs)  # what earlier tasks of this process parsed for other units is freed
    groups = make_groups(plan.keys, cfg)
    lo, hi = len(groups) * chunk // chunks, len(groups) * (chunk + 1) // chunks
    plan_s = time.perf_counter() - t0
    if bar is not None:
        bar.total += hi - lo
        bar.refresh()
    results = []
    for g in range(lo, hi):
        results.append(process_group(g, groups[g], cfg_dict, out_dir, shard_prefix(unit, units)))
        if bar is not None:
            bar.update(1)
    summary = None
    if chunk == 0:
        summary = {"sequences_in": len(plan.keys) + len(plan.quarantine) + len(plan.skipped),
                   "quarantine": plan.quarantine, "skipped": plan.skipped, "warnings": plan.warnings,
                   "info": plan.info, "subjects": sorted(present)}
    return {"unit": unit, "groups": results, "plan": summary, "plan_s": plan_s}


def _progress(total: int, enabled: bool, desc: str, unit: str = "group"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, leave=False)


def run_local(units: list[PreprocessConfig], cfg: PreprocessConfig, out_dir: str,
              timings: dict[str, float]) -> list[dict[str, Any]]:
    """The single-process path: every unit, planned then processed, in order."""
    t0, c0 = time.perf_counter(), time.process_time()
    with _progress(0, cfg.progress, f"preprocess {cfg.source}") as bar:
        results = [run_unit(u, len(units), dataclasses.asdict(ucfg), out_dir, bar=bar) for u, ucfg in enumerate(units)]
    timings["process_s"] = time.perf_counter() - t0
    timings["task_cpu_s"] = time.process_time() - c0
    timings["task_plan_s"] = sum(r["plan_s"] for r in results)
    return results


def init_ray(num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray (no dashboard) unless this process is; True if this call did."""
    from cluster.ray_session import connect

    return connect(num_cpus=num_cpus, dashboard=False, log_to_driver=False, configure_logging=False)


def chunk_counts(weights: list[float], cpus: int) -> list[int]:
    """Tasks per unit. Units of about one size: the fewest chunks each that fill every round of the CPUs (10
    files on 2 CPUs: one task per file, each parsed once; 3 files: two each). Else about CHUNKS_PER_CPU * cpus
    tasks in all, shared by weight (bytes), at least one per unit."""
    cpus = max(1, cpus)
    if weights and max(weights) <= ALIKE * min(weights):
        return [cpus // math.gcd(len(weights), cpus)] * len(weights)
    total = sum(weights) or 1.0
    target = CHUNKS_PER_CPU * max(1, cpus)
    return [max(1, round(target * w / total)) for w in weights]


def _unit_weight(cfg: PreprocessConfig) -> float:
    return float(os.path.getsize(cfg.input)) if isinstance(cfg.input, str) and os.path.isfile(cfg.input) else 1.0


def run_ray(units: list[PreprocessConfig], cfg: PreprocessConfig, out_dir: str,
            timings: dict[str, float]) -> list[dict[str, Any]]:
    """The Ray Data path: one row per (unit, chunk), `map` on the cluster's CPUs, results streamed back.

    The driver sends only the units' configs: each task plans its unit and reads its file itself (a worker keeps
    the file it parsed for its next chunk of it), and writes its shards straight into `out_dir`. Ray must be
    initialised. `timings` receives process_s, task_cpu_s, task_plan_s (planning and parsing in the tasks),
    tasks and cpus.
    """
    import ray

    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    reservation = ctx.op_resource_reservation_enabled
    try:
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # One operator, nothing downstream to protect: without this, Ray Data reserves half of the CPUs per
        # operator and on 2 CPUs started the map's tasks one at a time for the first seconds (measured).
        ctx.op_resource_reservation_enabled = False
        cpus = int(ray.cluster_resources().get("CPU", 1))
        unit_dicts = [dataclasses.asdict(u) for u in units]
        items = [{"unit": u, "chunk": k, "chunks": n}
                 for u, n in enumerate(chunk_counts([_unit_weight(u) for u in units], cpus)) for k in range(n)]

        def work(row: dict[str, Any]) -> dict[str, Any]:
            c0 = time.process_time()
            u = int(row["unit"])
            try:
                result = run_unit(u, len(unit_dicts), unit_dicts[u], out_dir, int(row["chunk"]), int(row["chunks"]))
            except PipelineError as e:  # the driver raises it with this message (no remote traceback)
                result = {"error": str(e)}
            result["cpu_s"] = time.process_time() - c0  # this task's CPU seconds in its worker
            result["pid"] = os.getpid()
            return {"result": json.dumps(result)}

        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(work, num_cpus=1)
        results = []
        with _progress(len(items), cfg.progress, f"preprocess {cfg.source} (ray)", unit="task") as bar:
            for row in ds.iter_rows():
                result = json.loads(row["result"])
                if "error" in result:
                    raise PipelineError(result["error"])
                results.append(result)
                bar.update(1)
        timings.update(process_s=time.perf_counter() - t0, task_cpu_s=sum(r["cpu_s"] for r in results),
                       task_plan_s=sum(r["plan_s"] for r in results), tasks=len(items), cpus=cpus,
                       workers=len({r["pid"] for r in results}))
        return results
    finally:
        ctx.op_resource_reservation_enabled = reservation


# ------------------------------------------------------------------------------------------ manifest
def build_key(cfg: PreprocessConfig, inputs: list[dict[str, Any]]) -> str:
    payload = {"schema_version": SCHEMA_VERSION, "pipeline_version": PIPELINE_VERSION,
               "config": cfg.content_dict(), "inputs": [{"name": Path(i["path"]).name, "sha256": i["sha256"]}
                                                        for i in inputs]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _what_changed(old: dict[str, Any], cfg: PreprocessConfig, inputs: list[dict[str, Any]]) -> str:
    changes = []
    old_cfg = old.get("config", {})
    for k, v in cfg.content_dict().items():
        if old_cfg.get(k) != v:
            changes.append(f"config {k}: {old_cfg.get(k)!r} -> {v!r}")
    old_inputs = {Path(i["path"]).name: i["sha256"] for i in old.get("inputs", [])}
    new_inputs = {Path(i["path"]).name: i["sha256"] for i in inputs}
    for name in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(name) != new_inputs.get(name):
            changes.append(f"input {name} " + ("added" if name not in old_inputs else
                                               "removed" if name not in new_inputs else "changed"))
    if old.get("schema_version") != SCHEMA_VERSION or old.get("pipeline_version") != PIPELINE_VERSION:
        changes.append("pipeline version changed")
    return "; ".join(changes[:8]) + (f"; ... ({len(changes)} changes)" if len(changes) > 8 else "") \
        if changes else "files differ from the manifest"


def _counts(sequences: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for split in SPLITS:
        seqs = [s for s in sequences if s["split"] == split]
        entry: dict[str, Any] = {
            "sequences": len(seqs), "windows": sum(s["windows"] for s in seqs),
            "frames": sum(s["frames"] for s in seqs), "valid_frames": sum(s["valid_frames"] for s in seqs),
        }
        for dim in ("subject", "action", "camera"):
            c: Counter = Counter()
            for s in seqs:
                c[s[dim]] += s["windows"]
            entry[f"windows_by_{dim}"] = dict(sorted(c.items()))
        nested: dict[str, Any] = {}
        for s in seqs:
            cameras = nested.setdefault(s["subject"], {}).setdefault(s["action"], {})
            cameras[s["camera"]] = cameras.get(s["camera"], 0) + s["windows"]  # several files may hold it
        entry["windows_by_subject_action_camera"] = nested
        counts[split] = entry
    return counts


# ------------------------------------------------------------------------------------------ the output folder
# The builder removes only what it can prove it wrote: a folder whose manifest it wrote (check_manifest) holding
# nothing but that manifest and the train/ and test/ files it lists; its own temporary and set-aside folders
# (named `.<out>.tmp-*` / `.<out>.old-*`, holding nothing but a manifest and train/, test/ Parquet files).
TMP_TAG, OLD_TAG = ".tmp-", ".old-"
LOCK_WAIT_S = 1800.0  # a second build of the same --out waits this long for the first, then fails
LOCK_POLL_S = 0.5


def _read_own_manifest(out: Path) -> dict[str, Any]:
    """The manifest of `out` if this builder wrote it, else PipelineError (nothing is touched)."""
    try:
        return read_manifest_file(out / MANIFEST, written_by_builder=True)
    except ValueError as e:
        raise PipelineError(f"{e}: {out} is not a shard folder this builder wrote; nothing was changed. "
                            "Choose another --out, or move the folder away") from None


def _foreign_entries(folder: Path, listed: set[str] | None) -> list[str]:
    """Entries of `folder` the builder did not write: anything but manifest.json and train/ and test/ holding
    the files in `listed` (relative paths), or any `*.parquet` when `listed` is None. Symlinks are foreign."""
    foreign = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == MANIFEST and entry.is_file(follow_symlinks=False):
            continue
        if entry.name in SPLITS and entry.is_dir(follow_symlinks=False):
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                rel = f"{entry.name}/{f.name}"
                ours = rel in listed if listed is not None else f.name.endswith(".parquet")
                if not (ours and f.is_file(follow_symlinks=False)):
                    foreign.append(rel)
            continue
        foreign.append(entry.name)
    return foreign


def _check_replaceable(out: Path, manifest: dict[str, Any]) -> None:
    """PipelineError naming the files of `out` the builder did not write (then nothing is changed)."""
    foreign = _foreign_entries(out, set(manifest["files"]))
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
        raise PipelineError(f"{out} holds files this builder did not write: {shown}; a rebuild would replace the "
                            "folder, so nothing was changed. Move them out of the folder, or choose another --out")


def _remove_own_folder(folder: Path, listed: set[str] | None) -> bool:
    """Delete the builder's files in `folder` (see `_foreign_entries`) and the folder if it is then empty.
    Returns False, touching nothing, if the folder holds anything else."""
    foreign = _foreign_entries(folder, listed)
    if foreign:
        log.warning("not removing %s: it holds files the builder did not write (%s)", folder, ", ".join(foreign[:5]))
        return False
    for split in SPLITS:
        d = folder / split
        if d.is_dir():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    (folder / MANIFEST).unlink(missing_ok=True)
    folder.rmdir()
    return True


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary and set-aside folders interrupted builds of `out` left (called under the lock, so no
    other build of `out` is using them)."""
    for tag in (TMP_TAG, OLD_TAG):
        for folder in out.parent.glob(f".{out.name}{tag}*"):
            if folder.is_dir() and not folder.is_symlink():
                log.info("removing the leftovers of an interrupted build: %s", folder)
                _remove_own_folder(folder, None)


@contextlib.contextmanager
def _build_lock(out: Path):
    """Hold `.<out>.lock` (fcntl.flock) for a whole build: a second build of the same --out waits (LOCK_WAIT_S),
    then fails with a message naming the holder."""
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PipelineError(f"{out}: cannot create the build lock {path} ({e.strerror}); is the folder "
                            "writable?") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() > deadline:
                    raise PipelineError(f"{out}: another build (pid {holder}) has held {path.name} for more than "
                                        f"{LOCK_WAIT_S:.0f} s; wait for it, or stop it, then run again") from None
                if not waited:
                    log.warning("%s: another build (pid %s) is writing it; waiting for it to finish", out, holder)
                    waited = True
                time.sleep(LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the (empty) lock file stays, removing it would race


def build_shards(
    source: str = "synthetic", out: str | Path | None = None, frames: int = 243, stride: int | None = None,
    use_ray: bool = False, config: PreprocessConfig | None = None, **options: Any,
) -> dict[str, Any]:
    """Build (or confirm up to date) the shard folder `out`; returns the manifest (plus `up_to_date`).

    Either pass a `PreprocessConfig` as `config`, or the common options directly plus any other
    `PreprocessConfig` field as a keyword, e.g. for tiny test shards without Ray:

        build_shards("synthetic", out=tmp_path / "shards", frames=27, stride=27, use_ray=False,
                     synthetic_subjects=2, synthetic_frames=120, n_cameras=1, progress=False)

    (SYN1 goes to train/, SYN2 to test/). `stride` defaults to frames // 3 (>= 1).
    """
    if config is None:
        if out is None:
            raise PipelineError("build_shards: `out` is required")
        options.setdefault("progress", False)
        config = PreprocessConfig(source=source, out=str(out), frames=frames,
                                  stride=stride or max(1, frames // 3), use_ray=use_ray, **options)
    cfg = config
    if not cfg.out:
        raise PipelineError("no output folder (--out)")
    t0 = time.perf_counter()
    out_path = Path(cfg.out).resolve()
    with _build_lock(out_path):
        return _build(cfg, out_path, t0, {})


def _build(cfg: PreprocessConfig, out_path: Path, t0: float, timings: dict[str, float]) -> dict[str, Any]:
    """List the units and inputs (no parsing), then either confirm `out_path` up to date or build it.

    The inputs are hashed in threads from the start: a rerun waits for their hashes (the up-to-date check needs
    them), a fresh build only when writing its manifest, so hashing overlaps Ray's start and the processing.
    """
    if out_path.exists() and not out_path.is_dir():
        raise PipelineError(f"{out_path} is a file, not a folder; choose another --out")
    if out_path.is_symlink():
        raise PipelineError(f"{out_path} is a symbolic link; give the folder it points to as --out")
    t1 = time.perf_counter()
    source = get_source(cfg.source)
    units = unit_configs(cfg, source)
    hashes = InputHashes(source.inputs(cfg))
    if cfg.use_ray:
        keep_npz_cached([])  # a source that parsed its input to list it (3dhp): the tasks read it themselves
    ray_started = False
    try:
        check_subject_lists(cfg, source)
        timings["plan_s"] = time.perf_counter() - t1
        old = None
        if (out_path / MANIFEST).is_file():
            old = _read_own_manifest(out_path)
            inputs = hashes.result(timings)
            problem = verify_files(out_path, old)
            same_key = old["build_key"] == build_key(cfg, inputs)
            if same_key and problem is None:
                log.info("%s is up to date (same inputs and config, shard hashes verified): nothing to do", out_path)
                return {**old, "up_to_date": True}
            _check_replaceable(out_path, old)
            log.info("rebuilding %s: %s", out_path, problem if same_key else _what_changed(old, cfg, inputs))
        elif out_path.exists() and any(out_path.iterdir()):
            raise PipelineError(f"{out_path} exists, is not empty and has no {MANIFEST}: not a shard folder; "
                                "choose another --out or remove it")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out_path)
        tmp = out_path.parent / f".{out_path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if cfg.use_ray:
                t1 = time.perf_counter()
                ray_started = init_ray(cfg.num_cpus)
                timings["ray_start_s"] = time.perf_counter() - t1
            timings["ready_s"] = time.perf_counter() - t0  # wall time before processing (listing, Ray's start)
            results = (run_ray if cfg.use_ray else run_local)(units, cfg, str(tmp), timings)
            if ray_started:
                t1 = time.perf_counter()
                _stop_ray()
                ray_started = False
                timings["ray_stop_s"] = time.perf_counter() - t1
            inputs = hashes.result(timings)
            manifest = _manifest(cfg, source, len(units), results, inputs, time.perf_counter() - t0, timings)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _swap_into_place(tmp, out_path, old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {**manifest, "up_to_date": False}
    finally:
        hashes.close()
        if ray_started:
            _stop_ray()  # after an error; a successful build stopped Ray before writing its manifest


class InputHashes:
    """sha256 of the input files, computed in threads from the moment it is created; `result` waits for them.

    hashlib and file reads release the GIL, so the threads run beside the driver's own work."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = sorted(set(paths))
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(self.paths), os.cpu_count() or 1, 4)),
                                        thread_name_prefix="hash-inputs")
        self._futures = [self._pool.submit(self._hash, p) for p in self.paths]

    @staticmethod
    def _hash(path: str) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        try:
            entry = {"path": str(Path(path)), "bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}
        except OSError as e:
            raise PipelineError(f"{path}: cannot read this input to hash it ({e.strerror or e})") from None
        return entry, time.perf_counter() - t0

    def result(self, timings: dict[str, float]) -> list[dict[str, Any]]:
        """[{path, bytes, sha256}] sorted by path; timings get hash_s (seconds spent hashing, summed over the
        files) and hash_wait_s (how long the caller waited for them)."""
        t0 = time.perf_counter()
        done = [f.result() for f in self._futures]
        timings["hash_wait_s"] = timings.get("hash_wait_s", 0.0) + time.perf_counter() - t0
        timings["hash_s"] = sum(s for _, s in done)
        return [entry for entry, _ in done]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _manifest(cfg: PreprocessConfig, source: Source, n_units: int, unit_results: list[dict[str, Any]],
              inputs: list[dict[str, Any]], seconds: float, timings: dict[str, float]) -> dict[str, Any]:
    plans = [r["plan"] for r in sorted(unit_results, key=lambda r: r["unit"]) if r["plan"] is not None]
    if len(plans) != n_units:
        raise PipelineError(f"internal error: {len(plans)} of {n_units} input units reported their plan")
    results = [g for _, _, g in sorted(((r["unit"], g["group"], g) for r in unit_results for g in r["groups"]),
                                       key=lambda t: t[:2])]
    sequences = [s for r in results for s in r["sequences"]]
    skipped = [s for p in plans for s in p["skipped"]]
    quarantine = [q for p in plans for q in p["quarantine"]] + [q for r in results for q in r["quarantine"]]
    present = {s for p in plans for s in p["subjects"]}
    warnings = [w for p in plans for w in p["warnings"]] + missing_subjects(present, cfg, source)
    for w in warnings:
        log.warning(w)
    files = {rel: info for r in results for rel, info in r["files"].items()}
    n_in = sum(p["sequences_in"] for p in plans)
    if n_in != len(sequences) + len(quarantine) + len(skipped):  # the invariant: nothing is lost silently
        raise PipelineError(f"internal error: {n_in} sequences in, {len(sequences)} written + "
                            f"{len(quarantine)} quarantined + {len(skipped)} skipped")
    rows = sum(f["rows"] for f in files.values())
    per_row_bytes = cfg.frames * (17 * (2 + 1 + 3) * 4 + 1)
    reproj: dict[str, list[float]] = defaultdict(list)
    for s in sequences:
        if s.get("reprojection_px") is not None:
            reproj[s["camera"]].append(s["reprojection_px"])
    shard_bytes = sum(f["bytes"] for f in files.values())
    info = dict(plans[0]["info"]) if plans else {}
    return {
        "schema_version": SCHEMA_VERSION, "pipeline_version": PIPELINE_VERSION,
        "build_key": build_key(cfg, inputs),
        "source": cfg.source, "synthetic": bool(info.get("synthetic", False)),
        "frames": cfg.frames, "stride": cfg.stride, "test_stride": cfg.effective_test_stride,
        "config": cfg.content_dict(), "inputs": inputs, "info": info,
        "sequences_in": n_in, "sequences_written": len(sequences), "sequences_quarantined": len(quarantine),
        "sequences_skipped": len(skipped), "skipped": skipped,
        "counts": _counts(sequences),
        "bytes": {"total": shard_bytes,
                  **{s: sum(f["bytes"] for r, f in files.items() if r.startswith(s + "/")) for s in SPLITS}},
        "tensor_bytes_raw": rows * per_row_bytes,
        "bytes_ratio": shard_bytes / max(1, rows * per_row_bytes),
        "reprojection_px": {c: float(np.mean(v)) for c, v in sorted(reproj.items())},
        "quarantine": quarantine, "warnings": warnings, "sequences": sequences,
        "files": dict(sorted(files.items())),
        "content_hash": content_hash({rel: f["sha256"] for rel, f in files.items()}),
        "seconds": round(seconds, 3), "timings": {k: round(v, 3) for k, v in timings.items()},
        "created_unix": int(time.time()),
    }


def _swap_into_place(tmp: Path, out: Path, old_manifest: dict[str, Any] | None) -> None:
    """Rename the finished temporary folder to `out`. The old build, if any, is moved aside, then its files (those
    its manifest lists, checked by `_check_replaceable`) removed; anything else found there is left, with a warning."""
    aside = None
    if out.exists():
        if old_manifest is None and any(out.iterdir()):
            raise PipelineError(f"{out} appeared during the build and is not empty; nothing was replaced")
        aside = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, aside)
    os.rename(tmp, out)
    if aside is not None:
        _remove_own_folder(aside, set(old_manifest["files"]) if old_manifest else set())
