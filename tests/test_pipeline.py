"""pipelines/: windows, shard round trip, splits, idempotency/atomicity, h36m reading. No Ray (fast)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from h2ot.config import load_config
from pipelines import TENSOR_COLUMNS, build_shards, load_manifest, manifest_hash, read_split
from pipelines.build import get_source, sequence_windows
from pipelines.config import PreprocessConfig
from pipelines.records import PipelineError, prepare_sequence
from pipelines.windows import num_windows, valid_mask, window_starts

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
H36M_MINI = SHARED / "h36m" / "data_3d_h36m_mini.npz"
needs_h36m = pytest.mark.skipif(not H36M_MINI.is_file(), reason="shared data (../shared) not present")

TINY = dict(synthetic_subjects=2, synthetic_frames=90, n_cameras=2, progress=False)


@pytest.mark.parametrize("length,frames,stride", [
    (1, 27, 9), (26, 27, 9), (27, 27, 9), (28, 27, 9), (100, 27, 27), (243, 243, 81), (1000, 243, 81),
    (1000, 243, 243), (5, 3, 1), (50, 10, 20),
])
def test_window_count_formula_and_coverage(length, frames, stride):
    starts = window_starts(length, frames, stride)
    n = 1 + max(0, math.ceil((length - frames) / stride))
    assert len(starts) == num_windows(length, frames, stride) == n
    assert np.all(np.diff(starts) == stride)
    covered = np.zeros(length, int)
    for s in starts:
        covered[max(0, s):min(length, s + frames)] += 1
    mask = valid_mask(length, starts, frames)
    assert mask.sum() == covered.sum()
    if stride <= frames:
        assert covered.min() >= 1  # every real frame is in some window
    if stride == frames:
        assert covered.max() == 1  # test windows count each frame once
    # padding is split between both ends
    left, right = -starts[0], starts[-1] + frames - length
    assert left >= 0 and right >= 0 and abs(left - right) <= max(1, stride)


def test_round_trip_exact_values(tmp_path):
    out = tmp_path / "s"
    m = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    assert m["synthetic"] and m["source"] == "synthetic"
    train = read_split(out, "train")
    src = get_source("synthetic")
    cfg = PreprocessConfig(source="synthetic", frames=27, stride=9, **TINY)
    key = {"subject": "SYN1", "action": "Running", "camera": "virt1", "camera_index": 1, "file": "<synthetic>"}
    prep = prepare_sequence(src.load(key, cfg), cfg.min_frames)
    win = sequence_windows(prep, 27, 9)
    rows = np.flatnonzero((train["subject"] == "SYN1") & (train["action"] == "Running")
                          & (train["camera"] == "virt1"))
    assert len(rows) == len(win["start"]) == num_windows(90, 27, 9)
    for col in TENSOR_COLUMNS:
        assert train[col].dtype == win[col].dtype
        np.testing.assert_array_equal(train[col][rows], win[col])  # bit-exact
    np.testing.assert_array_equal(train["start"][rows], win["start"])
    assert set(train["source"]) == {"synthetic"}
    assert np.all(train["pose_3d"][:, :, 0] == 0)  # root-relative
    assert train["pose_2d"].shape[1:] == (27, 17, 2) and train["valid"].dtype == np.uint8
    # the manifest's counts match the files
    assert m["counts"]["train"]["windows"] == len(train["start"])
    assert m["sequences_in"] == m["sequences_written"] + m["sequences_quarantined"] == 2 * 4 * 2


def test_no_subject_in_both_splits_and_test_stride(tmp_path):
    m = build_shards("synthetic", out=tmp_path / "s", frames=27, stride=9, synthetic_subjects=3,
                     synthetic_frames=60, n_cameras=1, progress=False, test_subjects=["SYN2"])
    train, test = read_split(tmp_path / "s", "train"), read_split(tmp_path / "s", "test")
    assert set(train["subject"]) == {"SYN1", "SYN3"} and set(test["subject"]) == {"SYN2"}
    assert not set(train["subject"]) & set(test["subject"])
    # test stride defaults to the window length: each real test frame appears exactly once
    assert test["valid"].sum() == 60 * 4 == m["counts"]["test"]["valid_frames"]


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, caplog):
    out = tmp_path / "s"
    m1 = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    m2 = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    assert m2["up_to_date"] and not m1["up_to_date"]
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with caplog.at_level("INFO"):
        m3 = build_shards("synthetic", out=out, frames=27, stride=27, **TINY)
    assert not m3["up_to_date"] and "config stride: 9 -> 27" in caplog.text
    assert manifest_hash(out) == m3["content_hash"] != m1["content_hash"]
    # a deleted shard is noticed and rebuilt
    next((out / "train").glob("*.parquet")).unlink()
    assert not build_shards("synthetic", out=out, frames=27, stride=27, **TINY)["up_to_date"]


def test_interrupted_write_is_not_taken_as_done(tmp_path, monkeypatch):
    import pipelines.build as build

    out = tmp_path / "s"
    calls = {"n": 0}
    real = build.write_shard

    def failing(table, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        return real(table, path)

    monkeypatch.setattr(build, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        build_shards("synthetic", out=out, frames=27, stride=9, rows_per_shard=8, **TINY)
    assert not out.exists()
    assert not list(tmp_path.glob(".s.tmp-*"))  # cleaned up
    with pytest.raises(FileNotFoundError):
        load_manifest(out)
    # a temp folder left by a killed process (dead pid) is never read, and is removed by the next build
    stale = tmp_path / ".s.tmp-999999999-deadbeef"
    (stale / "train").mkdir(parents=True)
    monkeypatch.setattr(build, "write_shard", real)
    m = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    assert not stale.exists() and not m["up_to_date"]
    # an existing build survives a failed rebuild
    monkeypatch.setattr(build, "write_shard", failing)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        build_shards("synthetic", out=out, frames=27, stride=3, rows_per_shard=8, **TINY)
    assert manifest_hash(out) == m["content_hash"]


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a shard folder"):
        build_shards("synthetic", out=tmp_path / "s", frames=27, **TINY)


def test_noise_is_seeded_and_lowers_confidence(tmp_path):
    kw = dict(frames=27, stride=27, **TINY)
    build_shards("synthetic", out=tmp_path / "a", noise_px=5.0, dropout=0.05, seed=1, **kw)
    build_shards("synthetic", out=tmp_path / "b", noise_px=5.0, dropout=0.05, seed=1, **kw)
    build_shards("synthetic", out=tmp_path / "c", seed=1, **kw)
    assert manifest_hash(tmp_path / "a") == manifest_hash(tmp_path / "b")
    a, c = read_split(tmp_path / "a", "train"), read_split(tmp_path / "c", "train")
    np.testing.assert_array_equal(a["pose_3d"], c["pose_3d"])
    err_px = np.abs(a["pose_2d"] - c["pose_2d"]) * 500  # normalised units -> pixels (width 1000)
    assert 2.0 < np.median(err_px) < 6.0
    assert (a["conf_2d"] == 0).mean() == pytest.approx(0.05, abs=0.02) and np.all(c["conf_2d"] == 1)


def test_synthetic_motion_is_human():
    from h2ot.skeleton import bone_lengths
    from pipelines.sources.synthetic import ACTIONS, synthesize_motion

    for action in ACTIONS:
        x = synthesize_motion(action, 200, 50.0, np.random.default_rng(0), scale=1.0)
        bones = bone_lengths(x)
        assert bones.std(0).max() < 1e-4  # rigid bones
        assert x[..., 2].min() >= 0.0 and 1.5 < x[:, 10, 2].mean() < 1.9  # on the floor, head up
        speed = np.linalg.norm(np.diff(x[:, 0, :2], axis=0), axis=-1).mean() * 50
        if action == "Walking":
            assert 0.8 < speed < 2.0
        if action == "Running":
            assert 2.0 < speed < 5.0
        if action in ("Gestures", "Turning"):
            assert speed < 0.3


@needs_h36m
def test_h36m_mini_split_counts_and_geometry(tmp_path):
    m = build_shards("h36m", out=tmp_path / "h", frames=81, stride=27, input=str(H36M_MINI))
    assert not m["synthetic"] and m["quarantine"] == []
    assert any("S11" in w for w in m["warnings"])  # a default subject missing is a warning
    assert set(m["counts"]["train"]["windows_by_subject"]) == {"S1"}
    assert set(m["counts"]["test"]["windows_by_subject"]) == {"S9"}
    assert m["sequences_written"] == 2 * 2 * 4  # subjects x actions x cameras
    per_seq = num_windows(600, 81, 27)
    assert m["counts"]["train"]["windows"] == 2 * 4 * per_seq
    test = read_split(tmp_path / "h", "test")
    assert test["valid"].sum() == 2 * 4 * 600
    assert np.abs(test["pose_2d"]).max() < 1.0  # in the images
    bones = np.linalg.norm(test["pose_3d"][:, :, 1] - test["pose_3d"][:, :, 0], axis=-1)
    np.testing.assert_allclose(bones, 0.1329, atol=1e-3)  # hip offset of the shared skeleton, metres


def test_every_shipped_preprocess_config_loads():
    files = sorted((REPO / "configs").glob("preprocess*.yaml"))
    assert files
    for f in files:
        cfg = load_config(f, kind="preprocess")
        assert isinstance(cfg, PreprocessConfig) and cfg.frames >= 1


def test_cli_synthetic(tmp_path, capsys):
    from jobs.preprocess import main

    args = ["--source", "synthetic", "--out", str(tmp_path / "s"), "--frames", "27", "--no-ray", "--no-progress",
            "--set", "synthetic_subjects=2", "--set", "synthetic_frames=60", "--cameras", "1"]
    assert main(args) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert main(args) == 0
    assert "nothing done" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["synthetic"] is True


# ------------------------------------------------------------------------- the output folder (issue 17)
def test_a_foreign_manifest_folder_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for text in ('{"name": "my project"}', "[1, 2]", "not json", '{"build_key": "x", "schema_version": 1, '
                 '"files": {"../../etc/passwd": {"bytes": 1, "sha256": "0"}}}'):
        (out / "manifest.json").write_text(text)
        (out / "thesis.tex").write_text("years of work")
        with pytest.raises(PipelineError, match="not a shard folder this builder wrote; nothing was changed"):
            build_shards("synthetic", out=out, frames=27, **TINY)
        assert (out / "thesis.tex").read_text() == "years of work" and (out / "manifest.json").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.lock", "mine"]


def test_a_rebuild_refuses_files_it_did_not_write(tmp_path):
    out = tmp_path / "s"
    m1 = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    (out / "notes.txt").write_text("mine")
    (out / "train" / "extra.parquet").write_text("mine too")
    with pytest.raises(PipelineError, match="notes.txt, train/extra.parquet.*nothing was changed"):
        build_shards("synthetic", out=out, frames=27, stride=27, **TINY)
    assert (out / "notes.txt").read_text() == "mine" and manifest_hash(out) == m1["content_hash"]
    # the same settings: up to date, nothing is touched
    assert build_shards("synthetic", out=out, frames=27, stride=9, **TINY)["up_to_date"]
    (out / "notes.txt").unlink()
    (out / "train" / "extra.parquet").unlink()
    m2 = build_shards("synthetic", out=out, frames=27, stride=27, **TINY)
    assert not m2["up_to_date"] and manifest_hash(out) == m2["content_hash"]
    assert not list(tmp_path.glob(".s.old-*")) and not list(tmp_path.glob(".s.tmp-*"))


def test_crash_leftovers_are_cleaned_but_foreign_ones_kept(tmp_path):
    out = tmp_path / "s"
    m = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    import shutil

    old = tmp_path / ".s.old-12345-abcdef01"  # a crash between the two renames of a swap
    shutil.copytree(out, old)
    odd = tmp_path / ".s.old-12346-abcdef02"
    (odd / "train").mkdir(parents=True)
    (odd / "train" / "keep.txt").write_text("not a shard")
    build_shards("synthetic", out=out, frames=27, stride=27, **TINY)
    assert not old.exists() and (odd / "train" / "keep.txt").exists()
    assert m["content_hash"] != manifest_hash(out)


def test_up_to_date_verifies_content_hashes(tmp_path):
    out = tmp_path / "s"
    m = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    shard = next((out / "train").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    again = build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    assert not again["up_to_date"] and manifest_hash(out) == m["content_hash"]
    assert build_shards("synthetic", out=out, frames=27, stride=9, **TINY)["up_to_date"]


def test_manifest_paths_stay_inside_the_splits(tmp_path):
    from pipelines.shards import verify_files

    out = tmp_path / "s"
    build_shards("synthetic", out=out, frames=27, stride=9, **TINY)
    manifest = json.loads((out / "manifest.json").read_text())
    for bad in ("../outside.parquet", "/etc/passwd", "train/../../x.parquet", "other/x.parquet", "train/a/b.parquet"):
        changed = {**manifest, "files": {bad: {"bytes": 1, "rows": 1, "sha256": "0"}}}
        assert "not inside train/ or test/" in verify_files(out, changed)
        (out / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="not inside train/ or test/"):
            load_manifest(out)
    (out / "manifest.json").write_text("[]")
    with pytest.raises(ValueError, match="not an object"):
        load_manifest(out)


def test_skipped_sequences_are_counted_and_listed(tmp_path, capsys):
    m = build_shards("synthetic", out=tmp_path / "s", frames=27, synthetic_subjects=3, synthetic_frames=60,
                     n_cameras=1, progress=False, train_subjects=["SYN1"], test_subjects=["SYN2"])
    assert m["sequences_skipped"] == 4 and {s["subject"] for s in m["skipped"]} == {"SYN3"}
    assert all("SYN3 is in neither" in s["reason"] for s in m["skipped"])
    assert m["sequences_in"] == m["sequences_written"] + m["sequences_quarantined"] + m["sequences_skipped"] == 12
    from jobs.preprocess import main

    args = ["--source", "synthetic", "--out", str(tmp_path / "s"), "--frames", "27", "--no-ray", "--no-progress",
            "--set", "synthetic_subjects=3", "--set", "synthetic_frames=60", "--cameras", "1",
            "--train-subjects", "SYN1", "--test-subjects", "SYN2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "12 in, 8 written, 0 quarantined, 4 skipped" in out and "SYN3 is in neither" in out


def test_two_builds_of_one_folder_do_not_meet(tmp_path, monkeypatch):
    import fcntl
    import threading

    import pipelines.build as build

    out = tmp_path / "s"
    results, errors = [], []

    def run(stride):
        try:
            results.append(build_shards("synthetic", out=out, frames=27, stride=stride, **TINY))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(9,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(r["up_to_date"] for r in results) == [False, True]
    assert manifest_hash(out) == results[0]["content_hash"] == results[1]["content_hash"]
    # a holder that does not let go: the second build fails with a clear message after LOCK_WAIT_S
    monkeypatch.setattr(build, "LOCK_WAIT_S", 0.3)
    with open(tmp_path / ".s.lock", "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="another build .* has held .s.lock"):
            build_shards("synthetic", out=out, frames=27, stride=27, **TINY)
    assert manifest_hash(out) == results[0]["content_hash"]
