"""Build a shard folder: plan sequences, process them in groups (Ray Data or one process), write atomically.

Both execution paths call the same `process_group` (load -> `prepare_sequence` -> windows -> `write_shard`)
on the same groups, so they write byte-identical files; only the scheduling differs:

- `use_ray=True`: a Ray Data pipeline, `from_items(groups).map(process_group)`, one task per group;
- `use_ray=False`: a plain loop in this process (fast tests, and the benchmark's baseline).

Idempotent and atomic: the build key hashes the content config, the schema and the inputs' bytes; an
unchanged key with intact files (their sha256 verified) is a no-op. A build writes `.<out>.tmp-<pid>-<id>/`,
checks that sequences in = written + quarantined + skipped (subjects in neither split, listed with the reason),
writes the manifest last and renames the folder into place.

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
from pipelines.safe_npz import cached_npz, npz_cache_keys, prime_npz_cache
from pipelines.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    TENSOR_COLUMNS,
    content_hash,
    file_sha256,
    read_manifest_file,
    verify_files,
    windows_table,
    write_shard,
)
from pipelines.sources.base import Plan, Source, plan_checked, read_sequence
from pipelines.windows import cut_windows, num_windows, valid_mask, window_starts

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
    reason (nothing disappears without a word). Returns warnings."""
    warnings = []
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
    present = {k["subject"] for k in plan.keys} | {q.get("subject") for q in plan.quarantine}
    test, train = subject_lists(cfg, source)
    for name, wanted in (("test", test), ("train", train or [])):
        for subject in wanted:
            if subject not in present:
                warnings.append(f"{name} subject {subject} is not in the input; skipped")
    overlap = set(test) & set(train or [])
    if overlap:
        raise PipelineError(f"subjects {sorted(overlap)} are in both train_subjects and test_subjects")
    plan.keys = kept
    return warnings


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
    length = len(prep.pose_3d)
    starts = window_starts(length, frames, stride)
    n = len(starts)
    valid = cut_windows(prep.valid, starts, frames) * valid_mask(length, starts, frames)
    return {
        "pose_2d": cut_windows(prep.pose_2d, starts, frames),
        "conf_2d": cut_windows(prep.conf_2d, starts, frames),
        "pose_3d": cut_windows(prep.pose_3d, starts, frames),
        "valid": valid.astype(np.uint8),
        "subject": [prep.subject] * n, "action": [prep.action] * n, "camera": [prep.camera] * n,
        "source": [prep.source] * n, "start": starts,
    }


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The windows of several sequences as one set of columns (arrays concatenated, lists joined)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for name in parts[0]:
        if name in TENSOR_COLUMNS or name == "start":
            out[name] = np.concatenate([p[name] for p in parts])
        else:
            out[name] = [v for p in parts for v in p[name]]
    return out


def process_group(group_id: int, keys: list[SeqKey], cfg_dict: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """THE unit of work of both paths: load, validate, prepare and window each sequence of a group, and
    write its shards `out_dir/<split>/part-<group>-<k>.parquet` (at most rows_per_shard rows each).

    Returns {"sequences": [...], "quarantine": [...], "files": {relpath: {bytes, rows, sha256}}}.
    """
    cfg = PreprocessConfig(**cfg_dict)
    source = get_source(cfg.source)
    per_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
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
        win = sequence_windows(prep, cfg.frames, stride)
        per_split[key["split"]].append(win)
        sequences.append({**ident, "frames": int(len(prep.pose_3d)), "windows": int(len(win["start"])),
                          "valid_frames": int(prep.valid.sum()), "reprojection_px": prep.reprojection_px})
    files = {}
    for split in SPLITS:
        parts = per_split.get(split)
        if not parts:
            continue
        columns = _concat(parts)  # once per split; each shard takes a slice (views, no copy)
        total = len(columns["start"])
        for k, lo in enumerate(range(0, total, cfg.rows_per_shard)):
            rel = f"{split}/part-{group_id:05d}-{k:03d}.parquet"
            table = windows_table({name: col[lo:lo + cfg.rows_per_shard] for name, col in columns.items()})
            size = write_shard(table, Path(out_dir) / rel)
            files[rel] = {"bytes": size, "rows": table.num_rows, "sha256": file_sha256(Path(out_dir) / rel)}
    return {"group": group_id, "sequences": sequences, "quarantine": quarantine, "files": files}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="group", leave=False)


def run_local(groups: list[list[SeqKey]], cfg: PreprocessConfig, out_dir: str) -> list[dict[str, Any]]:
    """The single-process path: process_group over every group, in order."""
    cfg_dict = dataclasses.asdict(cfg)
    results = []
    with _progress(len(groups), cfg.progress, f"preprocess {cfg.source}") as bar:
        for i, group in enumerate(groups):
            results.append(process_group(i, group, cfg_dict, out_dir))
            bar.update(1)
    return results


def init_ray(num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray (no dashboard) unless this process is; True if this call did."""
    from cluster.ray_session import connect

    return connect(num_cpus=num_cpus, dashboard=False, log_to_driver=False, configure_logging=False)


def run_ray(groups: list[list[SeqKey]], cfg: PreprocessConfig, out_dir: str,
            inputs: list[str] | None = None, timings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The Ray Data path: one row per group, `map(process_group)` on the cluster's CPUs, results streamed back.

    Input files the driver has already parsed while planning (`inputs`, e.g. the Human3.6M npz) go to the
    object store once and every worker maps them from there, instead of each worker parsing the file again.
    `timings` (if given) receives process_s, task_cpu_s and, if this call started Ray, ray_start_s and ray_stop_s.
    """
    import ray

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    started = init_ray(cfg.num_cpus)
    if started:
        timings["ray_start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    reservation = ctx.op_resource_reservation_enabled
    try:
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # One operator, nothing downstream to protect: without this, Ray Data reserves half of the CPUs per
        # operator and on 2 CPUs started the map's tasks one at a time for the first seconds (measured).
        ctx.op_resource_reservation_enabled = False
        cfg_dict = dataclasses.asdict(cfg)
        parsed = cached_npz(inputs or [])
        parsed_ref = ray.put(parsed) if parsed else None
        parsed_keys = list(parsed)

        def work(row: dict[str, Any]) -> dict[str, Any]:
            c0 = time.process_time()
            if parsed_ref is not None and not all(k in npz_cache_keys() for k in parsed_keys):
                prime_npz_cache(ray.get(parsed_ref))
            result = process_group(int(row["group"]), json.loads(row["keys"]), cfg_dict, out_dir)
            result["cpu_s"] = time.process_time() - c0  # this task's CPU seconds in its worker
            return {"group": int(row["group"]), "result": json.dumps(result)}

        items = [{"group": i, "keys": json.dumps(g)} for i, g in enumerate(groups)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map(work, num_cpus=1)
        results = []
        with _progress(len(groups), cfg.progress, f"preprocess {cfg.source} (ray)") as bar:
            for row in ds.iter_rows():
                results.append(json.loads(row["result"]))
                bar.update(1)
        timings["process_s"] = time.perf_counter() - t0
        timings["task_cpu_s"] = sum(r["cpu_s"] for r in results)
        return sorted(results, key=lambda r: r["group"])
    finally:
        ctx.op_resource_reservation_enabled = reservation
        if started:
            t1 = time.perf_counter()
            ray.shutdown()
            timings["ray_stop_s"] = time.perf_counter() - t1


# ------------------------------------------------------------------------------------------ manifest
def _hash_inputs(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in sorted(set(paths)):
        path = Path(p)
        out.append({"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return out


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
            nested.setdefault(s["subject"], {}).setdefault(s["action"], {})[s["camera"]] = s["windows"]
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
    timings: dict[str, float] = {}
    with _build_lock(out_path):
        return _plan_and_build(cfg, out_path, t0, timings)


def _plan_and_build(cfg: PreprocessConfig, out_path: Path, t0: float, timings: dict[str, float]) -> dict[str, Any]:
    ray_started = False
    try:
        inputs_exist = all(Path(p).exists() for p in (cfg.input, cfg.input_2d) if p)
        if cfg.use_ray and inputs_exist and not (out_path / MANIFEST).is_file():
            # A fresh build on Ray: start Ray while a thread plans (parses and hashes the input), since
            # ray.init mostly waits for its processes to come up. (Not for a rerun, which may be a no-op,
            # nor with a missing input, which fails at once.)
            with ThreadPoolExecutor(max_workers=1) as pool:
                planned = pool.submit(_plan, cfg, timings)
                t1 = time.perf_counter()
                try:
                    ray_started = init_ray(cfg.num_cpus)
                finally:
                    timings["ray_start_s"] = time.perf_counter() - t1
                plan, warnings, inputs = planned.result()
        else:
            plan, warnings, inputs = _plan(cfg, timings)
        return _build(cfg, out_path, plan, warnings, inputs, t0, timings, stop_ray=ray_started)
    finally:
        if ray_started:
            _stop_ray()  # after an error; a successful build stopped Ray before writing its manifest


def _plan(cfg: PreprocessConfig, timings: dict[str, float]) -> tuple[Plan, list[str], list[dict[str, Any]]]:
    """The source's plan with splits assigned, its warnings (logged) and the hashed inputs (timings: plan_s)."""
    t0 = time.perf_counter()
    src = get_source(cfg.source)
    plan = plan_checked(src, cfg)
    warnings = list(plan.warnings) + assign_splits(plan, cfg, src)
    for w in warnings:
        log.warning(w)
    inputs = _hash_inputs(plan.inputs)
    timings["plan_s"] = time.perf_counter() - t0
    return plan, warnings, inputs


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _build(cfg: PreprocessConfig, out_path: Path, plan: Plan, warnings: list[str], inputs: list[dict[str, Any]],
           t0: float, timings: dict[str, float], stop_ray: bool) -> dict[str, Any]:
    """The rest of build_shards once planned: the up-to-date check, then process, write and swap into place."""
    key = build_key(cfg, inputs)
    old = None
    if out_path.exists() and not out_path.is_dir():
        raise PipelineError(f"{out_path} is a file, not a folder; choose another --out")
    if out_path.is_symlink():
        raise PipelineError(f"{out_path} is a symbolic link; give the folder it points to as --out")
    if (out_path / MANIFEST).is_file():
        old = _read_own_manifest(out_path)
        problem = verify_files(out_path, old)
        if old["build_key"] == key and problem is None:
            log.info("%s is up to date (same inputs and config, shard hashes verified): nothing to do", out_path)
            return {**old, "up_to_date": True}
        _check_replaceable(out_path, old)
        log.info("rebuilding %s: %s", out_path, problem if old["build_key"] == key
                 else _what_changed(old, cfg, inputs))
    elif out_path.exists() and any(out_path.iterdir()):
        raise PipelineError(f"{out_path} exists, is not empty and has no {MANIFEST}: not a shard folder; "
                            "choose another --out or remove it")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_path)
    tmp = out_path.parent / f".{out_path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        groups = make_groups(plan.keys, cfg)
        timings["ready_s"] = time.perf_counter() - t0  # wall time before processing (plan, and Ray's start)
        if cfg.use_ray:
            results = run_ray(groups, cfg, str(tmp), plan.inputs, timings)
            if stop_ray:
                t1 = time.perf_counter()
                _stop_ray()
                timings["ray_stop_s"] = time.perf_counter() - t1
        else:
            t1, c1 = time.perf_counter(), time.process_time()
            results = run_local(groups, cfg, str(tmp))
            timings["process_s"] = time.perf_counter() - t1
            timings["task_cpu_s"] = time.process_time() - c1
        manifest = _manifest(cfg, plan, warnings, inputs, key, results, time.perf_counter() - t0, timings)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _swap_into_place(tmp, out_path, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "up_to_date": False}


def _manifest(cfg: PreprocessConfig, plan: Plan, warnings: list[str], inputs: list[dict[str, Any]], key: str,
              results: list[dict[str, Any]], seconds: float, timings: dict[str, float]) -> dict[str, Any]:
    sequences = [s for r in results for s in r["sequences"]]
    quarantine = list(plan.quarantine) + [q for r in results for q in r["quarantine"]]
    files = {rel: info for r in results for rel, info in r["files"].items()}
    n_in = len(plan.keys) + len(plan.quarantine) + len(plan.skipped)
    if n_in != len(sequences) + len(quarantine) + len(plan.skipped):  # the invariant: nothing is lost silently
        raise PipelineError(f"internal error: {n_in} sequences in, {len(sequences)} written + "
                            f"{len(quarantine)} quarantined + {len(plan.skipped)} skipped")
    rows = sum(f["rows"] for f in files.values())
    per_row_bytes = cfg.frames * (17 * (2 + 1 + 3) * 4 + 1)
    reproj: dict[str, list[float]] = defaultdict(list)
    for s in sequences:
        if s.get("reprojection_px") is not None:
            reproj[s["camera"]].append(s["reprojection_px"])
    shard_bytes = sum(f["bytes"] for f in files.values())
    return {
        "schema_version": SCHEMA_VERSION, "pipeline_version": PIPELINE_VERSION, "build_key": key,
        "source": cfg.source, "synthetic": bool(plan.info.get("synthetic", False)),
        "frames": cfg.frames, "stride": cfg.stride, "test_stride": cfg.effective_test_stride,
        "config": cfg.content_dict(), "inputs": inputs, "info": {k: v for k, v in plan.info.items()},
        "sequences_in": n_in, "sequences_written": len(sequences), "sequences_quarantined": len(quarantine),
        "sequences_skipped": len(plan.skipped), "skipped": plan.skipped,
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
