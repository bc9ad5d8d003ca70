"""pipelines/: several Human3.6M files in one build (list, folder, glob), counts summed over files, idempotency,
the Ray path reading each file in its tasks. Tiny generated files; only the Ray test starts Ray (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h2ot.config import ConfigError
from pipelines import build_shards, read_split
from pipelines.build import chunk_counts, shard_prefix
from pipelines.config import PreprocessConfig
from pipelines.records import PipelineError

FRAMES = 27
KW = dict(frames=FRAMES, stride=FRAMES, train_subjects=["S1"], test_subjects=["S9"], use_ray=False)


def _walk(n: int, shift_m: float) -> np.ndarray:
    """A standing pose walking slowly along y, [n, 32, 3] world metres; `shift_m` makes each file's bytes differ."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, size=(32, 3))
    base[:, 2] += 1.0
    x = np.repeat(base[None], n, axis=0)
    x[..., 1] += np.linspace(-0.5, 0.5, n)[:, None] + shift_m
    return x.astype(np.float32)


def _save(path: Path, shift_m: float, frames: int = 60) -> str:
    positions = {"S1": {"Walking": _walk(frames, shift_m), "Eating": _walk(frames // 2, shift_m)},
                 "S9": {"Walking": _walk(frames, shift_m)}}
    np.savez(path, positions_3d=np.array(positions, dtype=object))
    return str(path)


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[str, str]:
    folder = tmp_path / "in"
    folder.mkdir()
    return _save(folder / "data_3d_a.npz", 0.0), _save(folder / "data_3d_b.npz", 0.1)


def test_two_files_are_distinct_sequences_and_counts_sum(tmp_path, two_files):
    a, b = two_files
    one = build_shards("h36m", out=tmp_path / "one", input=a, **KW)
    both = build_shards("h36m", out=tmp_path / "both", input=[b, a], **KW)
    assert both["sequences_in"] == 2 * one["sequences_in"] == 2 * 3 * 4
    assert both["sequences_written"] == 2 * one["sequences_written"]
    for split in ("train", "test"):
        assert both["counts"][split]["windows"] == 2 * one["counts"][split]["windows"] > 0
    # the same subject/action/camera in both files: the nested counts add up, they do not overwrite
    nested_one = one["counts"]["train"]["windows_by_subject_action_camera"]["S1"]["Walking"]
    nested_both = both["counts"]["train"]["windows_by_subject_action_camera"]["S1"]["Walking"]
    assert nested_both == {cam: 2 * n for cam, n in nested_one.items()}
    assert {s["file"] for s in both["sequences"]} == {a, b}
    assert [i["path"] for i in both["inputs"]] == sorted([a, b])
    # shards are named after (file, group); the files' rows differ (b is shifted), start/strings repeat
    names = sorted(Path(r).name for r in both["files"])
    assert names[0].startswith("part-000-") and names[-1].startswith("part-001-")
    train = read_split(tmp_path / "both", "train")
    assert len(train["start"]) == both["counts"]["train"]["windows"]
    single = read_split(tmp_path / "one", "train")
    np.testing.assert_array_equal(train["pose_3d"][: len(single["start"])], single["pose_3d"])


def test_a_list_a_folder_and_a_glob_build_the_same_shards(tmp_path, two_files):
    a, b = two_files
    folder = str(Path(a).parent)
    (Path(folder) / "notes.npz").write_bytes(b"not a data_3d file: the folder form ignores it")
    hashes = {build_shards("h36m", out=tmp_path / name, input=spec, **KW)["content_hash"]
              for name, spec in (("list", [a, b]), ("reversed", [b, a]), ("folder", folder),
                                 ("glob", f"{folder}/data_3d_*.npz"))}
    assert len(hashes) == 1


def test_single_file_forms_keep_the_single_file_build(tmp_path, two_files):
    a, _ = two_files
    plain = build_shards("h36m", out=tmp_path / "plain", input=a, **KW)
    listed = build_shards("h36m", out=tmp_path / "listed", input=[a], **KW)
    assert PreprocessConfig(source="h36m", input=[a]).input == a  # a list of one is that file
    assert listed["build_key"] == plain["build_key"] and listed["content_hash"] == plain["content_hash"]
    assert all(Path(r).name.startswith("part-00000-") for r in plain["files"])  # no file number in the names


def test_rerun_is_a_no_op_and_a_changed_file_rebuilds(tmp_path, two_files, caplog):
    a, b = two_files
    out = tmp_path / "o"
    first = build_shards("h36m", out=out, input=[a, b], **KW)
    again = build_shards("h36m", out=out, input=[a, b], **KW)
    assert again["up_to_date"] and again["content_hash"] == first["content_hash"]
    assert {"hash_s", "hash_wait_s", "plan_s", "process_s", "task_cpu_s"} <= set(first["timings"])
    _save(Path(b), 0.2)
    with caplog.at_level("INFO", logger="pipelines.build"):
        rebuilt = build_shards("h36m", out=out, input=[a, b], **KW)
    assert not rebuilt["up_to_date"] and rebuilt["content_hash"] != first["content_hash"]
    assert "input data_3d_b.npz changed" in caplog.text


def test_missing_subject_warnings_look_at_every_file(tmp_path):
    only_s1 = tmp_path / "data_3d_s1.npz"
    np.savez(only_s1, positions_3d=np.array({"S1": {"Walking": _walk(60, 0)}}, dtype=object))
    only_s9 = tmp_path / "data_3d_s9.npz"
    np.savez(only_s9, positions_3d=np.array({"S9": {"Walking": _walk(60, 0)}}, dtype=object))
    m = build_shards("h36m", out=tmp_path / "o", input=[str(only_s1), str(only_s9)], **KW)
    assert m["warnings"] == []
    m1 = build_shards("h36m", out=tmp_path / "o1", input=str(only_s1), **KW)
    assert m1["warnings"] == ["test subject S9 is not in the input; skipped"]


@pytest.mark.parametrize("spec, message", [
    ("nope.npz", "no such file or folder"),
    ("empty_dir", "a folder without VideoPose3D 3D files"),
    ("in/*.nothing", "no file matches this pattern"),
])
def test_inputs_that_match_nothing_are_clear_errors(tmp_path, two_files, spec, message):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PipelineError, match=message):
        build_shards("h36m", out=tmp_path / "o", input=str(tmp_path / spec), **KW)
    assert not (tmp_path / "o").exists()


def test_detections_pair_with_one_file_and_lists_are_for_h36m(tmp_path, two_files):
    a, b = two_files
    with pytest.raises(PipelineError, match="--input-2d pairs one detections file with one 3D file"):
        build_shards("h36m", out=tmp_path / "o", input=[a, b], input_2d=a, **KW)
    with pytest.raises(ConfigError, match="several files work for h36m"):
        PreprocessConfig(source="cmu", input=[a, b])
    with pytest.raises(ConfigError, match="input: expected a file"):
        PreprocessConfig(source="h36m", input=[])


def test_chunks_share_the_cpus_by_file_size():
    assert chunk_counts([100.0] * 10, cpus=2) == [1] * 10  # a file per task: each parsed once
    assert chunk_counts([100.0, 110.0], cpus=2) == [1, 1]  # alike: one round, no file split
    assert chunk_counts([100.0] * 3, cpus=2) == [2, 2, 2]  # 3 rounds of half files, not 2 of whole ones
    assert chunk_counts([100.0], cpus=2) == [2] and chunk_counts([100.0] * 10, cpus=1) == [1] * 10
    assert chunk_counts([300.0, 100.0], cpus=2) == [3, 1]  # unlike: shared by size
    assert shard_prefix(0, 1) == "part" and shard_prefix(7, 12) == "part-007"


@pytest.mark.slow
def test_ray_path_with_two_files_writes_the_same_shards(tmp_path, two_files):
    """Ray Data, each task planning and parsing its file, writes the single process's files byte for byte."""
    a, b = two_files
    kw = {**KW, "num_cpus": 2, "rows_per_shard": 2}  # small groups: several chunks per file
    local = build_shards("h36m", out=tmp_path / "local", input=[a, b], **kw)
    on_ray = build_shards("h36m", out=tmp_path / "ray", input=[a, b], **{**kw, "use_ray": True})
    assert on_ray["content_hash"] == local["content_hash"]
    assert on_ray["counts"] == local["counts"] and on_ray["sequences"] == local["sequences"]
    timings = on_ray["timings"]
    assert timings["tasks"] >= 2 and timings["cpus"] == 2 and timings["task_plan_s"] > 0
    assert json.loads(json.dumps(on_ray["quarantine"])) == local["quarantine"]
