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
