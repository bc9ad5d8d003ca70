"""pipelines/ sources: bad inputs quarantined with reasons (count invariant), restricted unpickler, CMU/BVH/3DHP."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from h2ot.skeleton import bone_lengths
from pipelines import build_shards, read_split
from pipelines.records import PipelineError
from pipelines.safe_npz import UnsafePickle, load_npz

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
H36M_MINI = SHARED / "h36m" / "data_3d_h36m_mini.npz"
CMU = SHARED / "cmu_asfamc"


def _walk(n: int = 60, joints: int = 32) -> np.ndarray:
    """A standing pose moving slowly along y, [n, joints, 3] world metres near the room centre."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.01, size=(joints, 3))
    base[:, 2] += 1.0
    x = np.repeat(base[None], n, axis=0)
    x[..., 1] += np.linspace(-0.5, 0.5, n)[:, None]
    return x.astype(np.float32)


def _save_h36m(path: Path, positions: dict) -> str:
    np.savez(path, positions_3d=np.array(positions, dtype=object))
    return str(path)


def _bad_file(tmp_path: Path) -> str:
    nan = _walk()
    nan[10, 3, 0] = np.nan
    return _save_h36m(tmp_path / "bad.npz", {
        "S1": {"Good": _walk(), "NaN": nan, "Short": _walk(3), "Empty": _walk(0), "Joints": _walk(joints=20),
               "Rank": _walk()[:, :, 0], "Absurd": _walk() * 1000, "Text": "not an array"},
        "S2": {"Walking": _walk()},  # no calibration for S2
        "S5": "not a dict",
        "S9": {"Good": _walk(), "ShortDet": _walk(), "LongDet": _walk()},
    })


def test_every_bad_h36m_input_is_quarantined_with_its_reason(tmp_path):
    path = _bad_file(tmp_path)
    det = {"S9": {"Good": [np.full((60, 17, 2), 500.0)] * 4, "ShortDet": [np.full((50, 17, 2), 500.0)] * 4,
                  "LongDet": [np.full((70, 17, 2), 500.0)] * 4}}
    np.savez(tmp_path / "det.npz", positions_2d=np.array(det, dtype=object))
    det_path = str(tmp_path / "det.npz")
    m = build_shards("h36m", out=tmp_path / "o", frames=27, stride=27, input=path,
                     train_subjects=["S1", "S2", "S5"], test_subjects=["S9"])
    assert m["sequences_in"] == m["sequences_written"] + m["sequences_quarantined"]
    assert m["sequences_written"] == 4 * 4  # S1 Good, S9 Good/ShortDet/LongDet x 4 cameras
    md = build_shards("h36m", out=tmp_path / "od", frames=27, stride=27, input=path, input_2d=det_path,
                      train_subjects=[], test_subjects=["S9"])
    m["quarantine"] += md["quarantine"]
    reasons = {(q["subject"], q["action"]): q["reason"] for q in m["quarantine"]}
    assert "NaN/inf at frame 10" in reasons[("S1", "NaN")]
    assert "too short" in reasons[("S1", "Short")]
    assert "empty" in reasons[("S1", "Empty")]
    assert "wrong joint count" in reasons[("S1", "Joints")]
    assert "rank 2" in reasons[("S1", "Rank")]
    assert "absurd" in reasons[("S1", "Absurd")]
    assert "not an array" in reasons[("S1", "Text")]
    assert "unknown subject S2" in reasons[("S2", "Walking")]
    assert "not a dict" in reasons[("S5", None)]
    assert "2D/3D length mismatch" in reasons[("S9", "ShortDet")]
    assert ("S9", "LongDet") not in reasons  # longer detections are truncated, as VideoPose3D does
    assert all(q["file"] for q in m["quarantine"])
    # S1 is in neither split of this build: its sequences are counted as skipped, with the reason (issue 17)
    assert md["sequences_in"] - md["sequences_skipped"] == md["sequences_written"] + md["sequences_quarantined"] \
        == 3 * 4
    assert md["sequences_skipped"] and all("neither" in s["reason"] for s in md["skipped"])
    assert set(md["reprojection_px"]) == {"54138969", "55011271", "58860488", "60457274"}
    # --strict fails on the first bad sequence instead, naming it
    with pytest.raises(PipelineError, match="S1/NaN"):
        build_shards("h36m", out=tmp_path / "strict", frames=27, input=path, train_subjects=["S1"],
                     test_subjects=[], strict=True)
    assert not (tmp_path / "strict").exists()


def test_crafted_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    arr = np.empty((), dtype=object)
    arr[()] = {"S1": Evil()}
    np.savez(tmp_path / "evil.npz", positions_3d=arr)
    with pytest.raises(UnsafePickle, match="posix.system|os.system|nt.system"):
        load_npz(tmp_path / "evil.npz")
    assert not marker.exists()
    # plain data still loads, and the CLI gives one line and exit 2
    from jobs.preprocess import main

    assert main(["--source", "h36m", "--input", str(tmp_path / "evil.npz"), "--out", str(tmp_path / "o"),
                 "--no-ray", "--no-progress"]) == 2
    assert not marker.exists()
    assert pickle.loads(pickle.dumps({"a": [1, 2.0, "x", (None, True)]})) == {"a": [1, 2.0, "x", (None, True)]}


@pytest.mark.parametrize("content,match", [
    (b"this is not a zip", "not an npz"),
    (None, "truncated|not an npz"),
])
def test_unreadable_input_is_one_line_and_exit_2(tmp_path, capsys, content, match):
    from jobs.preprocess import main

    path = tmp_path / "broken.npz"
    if content is None:  # a truncated real file
        good = _save_h36m(tmp_path / "good.npz", {"S1": {"Walking": _walk(500)}})
        content = Path(good).read_bytes()[:2000]
    path.write_bytes(content)
    code = main(["--source", "h36m", "--input", str(path), "--out", str(tmp_path / "o"), "--no-ray",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "broken.npz" in err[0] and "Traceback" not in err[0]
    import re
    assert re.search(match, err[0])
    np.savez(tmp_path / "nokey.npz", something=np.zeros(3))
    assert main(["--source", "h36m", "--input", str(tmp_path / "nokey.npz"), "--out", str(tmp_path / "o"),
                 "--no-ray", "--no-progress"]) == 2
    assert "missing key 'positions_3d'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- CMU
@pytest.mark.skipif(not (CMU / "02" / "02.asf").is_file(), reason="shared data (../shared) not present")
def test_cmu_mapping_is_human_and_upright():
    from pipelines.sources.cmu import load_trial

    x = load_trial(CMU / "02" / "02.asf", CMU / "02" / "02_03.amc", fps=50.0)
    assert len(x) == int((173 - 1) / 120 * 50) + 1  # 120 -> 50 fps
    b = bone_lengths(x).mean(0)  # BONES order: hips, thighs, shins, spine, ..., arms
    thigh, shin, upper_arm = b[1], b[2], b[11]
    assert 0.35 < thigh < 0.5 and 0.35 < shin < 0.5 and 0.22 < upper_arm < 0.35
    assert 0.1 < b[0] < 0.16  # pelvis -> hip
    z = x[..., 2]
    assert np.all(x[:, 10, 2] > x[:, 0, 2] + 0.4) and np.all(x[:, 0, 2] > x[:, 3, 2] + 0.5)  # head > pelvis > ankle
    assert 1.4 < np.median(x[:, 10, 2]) < 1.9 and abs(np.median(np.minimum(z[:, 3], z[:, 6])) - 0.08) < 1e-6
    # left/right: the right hip is on the right of the walking direction
    right = x[:, 1, :2] - x[:, 4, :2]
    vel = np.gradient(x[:, 0, :2], axis=0)
    cross = vel[:, 0] * right[:, 1] - vel[:, 1] * right[:, 0]  # z of vel x right: < 0 when right is on the right
    assert (cross < 0).mean() > 0.9


def _write_asf_amc(tmp_path: Path, bad_line: str | None = None) -> Path:
    src = CMU / "02"
    d = tmp_path / "cmu" / "02"
    d.mkdir(parents=True)
    (d / "02.asf").write_text((src / "02.asf").read_text())
    lines = (src / "02_03.amc").read_text().splitlines()
    (d / "02_03.amc").write_text("\n".join(lines) + "\n")
    if bad_line is not None:
        bad = list(lines)
        bad[40] = bad_line
        (d / "02_02.amc").write_text("\n".join(bad) + "\n")
        (d / "02_04.amc").write_text("\n".join(lines[:-5]) + "\n")  # truncated mid-frame: still parses
    return tmp_path / "cmu"


@pytest.mark.skipif(not (CMU / "02" / "02.asf").is_file(), reason="shared data (../shared) not present")
def test_cmu_build_quarantines_malformed_amc(tmp_path):
    root = _write_asf_amc(tmp_path, bad_line="lfemur 1.0 two 3.0")
    m = build_shards("cmu", out=tmp_path / "o", frames=27, stride=27, input=str(root), n_cameras=2,
                     test_subjects=[])
    bad = [q for q in m["quarantine"] if q["action"] == "02_02"]
    assert len(bad) == 2 and "02_02.amc:41: malformed numbers" in bad[0]["reason"]
    assert m["sequences_in"] == m["sequences_written"] + m["sequences_quarantined"]
    train = read_split(tmp_path / "o", "train")
    assert set(train["action"]) == {"02_03", "02_04"} and set(train["camera"]) == {"virt0", "virt1"}
    assert np.abs(train["pose_2d"]).max() < 1.0


# ----------------------------------------------------------------------------------------------- BVH
# (name, offset in cm, children); leaves get an End Site. Y up, like most BVH exports.
BVH_SKELETON = ("Hips", (0, 0, 0), [
    ("RightUpLeg", (-10, 0, 0), [("RightLeg", (0, -45, 0), [("RightFoot", (0, -45, 0), [])])]),
    ("LeftUpLeg", (10, 0, 0), [("LeftLeg", (0, -45, 0), [("LeftFoot", (0, -45, 0), [])])]),
    ("Spine1", (0, 23, 0), [("Spine2", (0, 25, 0), [
        ("Neck", (0, 12, 0), [("Head", (0, 11, 0), [])]),
        ("LeftArm", (15, 0, 0), [("LeftForeArm", (28, 0, 0), [("LeftHand", (25, 0, 0), [])])]),
        ("RightArm", (-15, 0, 0), [("RightForeArm", (-28, 0, 0), [("RightHand", (-25, 0, 0), [])])]),
    ])]),
])


def _bvh_joint(node, depth: int, root: bool = False) -> list[str]:
    name, off, children = node
    pad = "  " * depth
    channels = "CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation" if root \
        else "CHANNELS 3 Zrotation Xrotation Yrotation"
    lines = [f"{pad}{'ROOT' if root else 'JOINT'} {name}", f"{pad}{{", f"{pad}  OFFSET {off[0]} {off[1]} {off[2]}",
             f"{pad}  {channels}"]
    for child in children:
        lines += _bvh_joint(child, depth + 1)
    if not children:
        lines += [f"{pad}  End Site", f"{pad}  {{", f"{pad}    OFFSET 0 5 0", f"{pad}  }}"]
    return lines + [f"{pad}}}"]


def _bvh_text(frames: int = 120) -> str:
    n_ch = 6 + 3 * 16
    rows = []
    for f in range(frames):
        row = np.zeros(n_ch)
        row[:3] = [0, 100, f * 1.0]  # cm, y up, walking along z
        row[6 + 1] = 20 * np.sin(f / 10)  # right hip flexion (X rotation)
        rows.append(" ".join(f"{v:.4f}" for v in row))
    return "\n".join(["HIERARCHY"] + _bvh_joint(BVH_SKELETON, 0, root=True)) \
        + f"\nMOTION\nFrames: {frames}\nFrame Time: 0.0333333\n" + "\n".join(rows) + "\n"


def test_bvh_source_maps_units_axes_and_quarantines_bad_files(tmp_path):
    d = tmp_path / "bvh" / "subjA"
    d.mkdir(parents=True)
    (d / "walk.bvh").write_text(_bvh_text())
    (d / "broken.bvh").write_text(_bvh_text().replace("CHANNELS 3 Zrotation Xrotation Yrotation", "CHANNELS 3 Z", 1))
    (d / "short.bvh").write_text(_bvh_text()[:-200])
    m = build_shards("bvh", out=tmp_path / "o", frames=27, stride=27, input=str(tmp_path / "bvh"), n_cameras=1,
                     test_subjects=[])
    reasons = {q["action"]: q["reason"] for q in m["quarantine"]}
    assert "CHANNELS says 3 but lists 1" in reasons["broken"] and "broken.bvh:" in reasons["broken"]
    assert "walk" not in reasons and "short" in reasons
    assert m["sequences_in"] == m["sequences_written"] + m["sequences_quarantined"] == 3
    from pipelines.sources.bvh import _load

    x = _load(str(d / "walk.bvh"), os.stat(d / "walk.bvh").st_mtime_ns, 50.0, ())
    assert len(x) == int(119 * 0.0333333 * 50) + 1  # 30 -> 50 fps
    b = bone_lengths(x)[0]
    np.testing.assert_allclose(b[1], 0.45, atol=1e-4)  # cm -> metres
    assert x[0, 10, 2] > x[0, 0, 2] > x[0, 3, 2]  # y up -> z up


# ----------------------------------------------------------------------------------------------- 3DHP
def test_3dhp_layout_joint_order_and_valid_frames(tmp_path):
    from pipelines.sources.mpi3dhp import MPI3DHP_TO_H36M

    rng = np.random.default_rng(0)
    h36m_like = np.load(H36M_MINI, allow_pickle=True)["positions_3d"].item()["S9"]["Walking"] \
        if H36M_MINI.is_file() else None
    t = 100
    x3_h36m = rng.normal(0, 0.2, size=(t, 17, 3)) + [0, 0, 4.0] if h36m_like is None else \
        h36m_like[:t, [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27]] + [0, 0, 4.0]
    inv = np.argsort(MPI3DHP_TO_H36M)
    x3 = x3_h36m[:, inv] * 1000.0  # 3DHP order, mm
    x2 = rng.uniform(100, 1900, size=(t, 17, 2))
    valid = np.ones(t, bool)
    valid[:10] = False
    data = {"TS1": {"data_3d": x3, "data_2d": x2, "valid": valid},
            "TS5": {"data_3d": x3, "data_2d": x2},
            "TS9": {"data_3d": x3[:, :15], "data_2d": x2}}
    np.savez(tmp_path / "data_test_3dhp.npz", data=np.array(data, dtype=object))
    m = build_shards("3dhp", out=tmp_path / "o", frames=27, input=str(tmp_path / "data_test_3dhp.npz"))
    assert [q["subject"] for q in m["quarantine"]] == ["TS9"] and "expected [T, 17, 3]" in m["quarantine"][0]["reason"]
    test = read_split(tmp_path / "o", "test")
    assert set(test["subject"]) == {"TS1", "TS5"}
    ts1 = test["subject"] == "TS1"
    assert test["valid"][ts1].sum() == t - 10
    rel = x3_h36m - x3_h36m[:, :1]
    starts = test["start"][ts1]
    first = int(np.argmax(starts >= 0))
    np.testing.assert_allclose(test["pose_3d"][ts1][first, 0], rel[starts[first]], atol=1e-5)
    # 2D normalised by the sequence's own image size (TS1 2048x2048, TS5 1920x1080)
    u = test["pose_2d"][ts1][first, 0, 0, 0]
    assert u == pytest.approx(x2[starts[first], MPI3DHP_TO_H36M[0], 0] / 2048 * 2 - 1, abs=1e-5)


def test_npz_cache_keeps_only_what_the_current_unit_reads(tmp_path):
    """A worker parses each file once, and frees the last file when it moves on to another (bounded memory)."""
    from pipelines import safe_npz

    safe_npz._CACHE.clear()
    one = _save_h36m(tmp_path / "one.npz", {"S1": {"Walking": _walk(30)}})
    two = _save_h36m(tmp_path / "two.npz", {"S1": {"Walking": _walk(20)}})
    data = safe_npz.load_npz_cached(one)
    assert safe_npz.load_npz_cached(one) is data  # parsed once
    safe_npz.load_npz_cached(two)
    safe_npz.keep_npz_cached([two])
    assert [k[0] for k in safe_npz._CACHE] == [two]
    assert safe_npz.load_npz_cached(one) is not data  # parsed again, and equal
    np.testing.assert_array_equal(safe_npz.load_npz_cached(one)["positions_3d"].item()["S1"]["Walking"], _walk(30))
    for i in range(3):  # the cache holds at most two files
        safe_npz.load_npz_cached(_save_h36m(tmp_path / f"f{i}.npz", {"S1": {"Walking": _walk(20)}}))
    assert len(safe_npz._CACHE) == 2


@pytest.mark.slow
@pytest.mark.skipif(not H36M_MINI.is_file(), reason="shared data (../shared) not present")
def test_ray_path_writes_the_same_shards_as_one_process(tmp_path):
    """The Ray Data path (each task reads the file itself) and the plain loop write identical files."""
    kw = dict(frames=27, stride=27, input=str(H36M_MINI), num_cpus=2, progress=False)
    local = build_shards("h36m", out=tmp_path / "local", use_ray=False, **kw)
    ray_built = build_shards("h36m", out=tmp_path / "ray", use_ray=True, **kw)
    assert ray_built["content_hash"] == local["content_hash"]
    assert ray_built["sequences_written"] == local["sequences_written"] > 0


# ------------------------------------------------------------------------------- crafted inputs (issue 17)
def test_h36m_non_string_keys_are_quarantined_not_a_crash(tmp_path):
    path = _save_h36m(tmp_path / "keys.npz", {1: {"Walking": _walk()}, "S1": {2: _walk(), "Good": _walk()}})
    m = build_shards("h36m", out=tmp_path / "o", frames=27, stride=27, input=path, train_subjects=["S1", "1"],
                     test_subjects=[])
    reasons = [q["reason"] for q in m["quarantine"]]
    assert any("subject key 1 is a int" in r for r in reasons)
    assert any("action key 2 is a int" in r for r in reasons)
    assert m["sequences_written"] == 4 and all(q["file"] == path for q in m["quarantine"])
    assert m["sequences_in"] == m["sequences_written"] + m["sequences_quarantined"] + m["sequences_skipped"]


@pytest.mark.parametrize("image_size,ok", [
    (np.array([2048, 2048]), True), ([1920, 1080], True), (0, False), ([1920], False), ([-1920, 1080], False),
    (np.array([np.nan, 1080.0]), False), ("1920x1080", False), ([[1920, 1080]], False), ([1e12, 1080], False),
])
def test_3dhp_image_size_is_validated(tmp_path, image_size, ok):
    rng = np.random.default_rng(0)
    x3 = rng.normal(0, 100, size=(40, 17, 3)) + [0, 0, 4000.0]
    x2 = rng.uniform(100, 1000, size=(40, 17, 2))
    data = {"TS1": {"data_3d": x3, "data_2d": x2, "image_size": image_size}, "TS2": {"data_3d": x3, "data_2d": x2}}
    np.savez(tmp_path / "d.npz", data=np.array(data, dtype=object))
    m = build_shards("3dhp", out=tmp_path / "o", frames=27, input=str(tmp_path / "d.npz"))
    assert m["sequences_written"] == (2 if ok else 1)
    if not ok:
        assert [q["subject"] for q in m["quarantine"]] == ["TS1"] and "image_size" in m["quarantine"][0]["reason"]


def _asf_with(tmp_path: Path, replace: tuple[str, str] | None = None, append_hierarchy: str | None = None) -> Path:
    text = (CMU / "02" / "02.asf").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(replace[0], replace[1], 1)
    if append_hierarchy:
        text = text.replace(":hierarchy\n  begin\n", f":hierarchy\n  begin\n    {append_hierarchy}\n", 1)
    d = tmp_path / "cmu" / "02"
    d.mkdir(parents=True)
    (d / "02.asf").write_text(text)
    (d / "02_03.amc").write_text((CMU / "02" / "02_03.amc").read_text())
    return tmp_path / "cmu"


@pytest.mark.timeout(60)
@pytest.mark.skipif(not (CMU / "02" / "02.asf").is_file(), reason="shared data (../shared) not present")
@pytest.mark.parametrize("edit,reason", [
    (dict(append_hierarchy="lfemur lfemur"), "own parent"),
    (dict(append_hierarchy="ltibia lhipjoint"), "two parents"),
    (dict(replace=("order TX TY TZ RX RY RZ", "order TX TY TZ RX RY")), "root order"),
    (dict(replace=("order TX TY TZ RX RY RZ", "order TX TY TZ RX RY RW")), "root order"),
    (dict(replace=("axis XYZ", "axis XYQ")), "root axis"),
    (dict(replace=("length 0.45", "length 0")), "units length"),
    (dict(replace=("dof rx ry rz", "dof rx ry rq")), "unknown dof"),
])
def test_cmu_bad_skeleton_quarantines_with_reason(tmp_path, edit, reason):
    root = _asf_with(tmp_path, **edit)
    m = build_shards("cmu", out=tmp_path / "o", frames=27, input=str(root), n_cameras=1, test_subjects=[])
    assert m["sequences_written"] == 0 and m["sequences_quarantined"] == 1
    assert reason in m["quarantine"][0]["reason"] and "02.asf" in m["quarantine"][0]["reason"]


@pytest.mark.timeout(60)
def test_asf_cycle_terminates(tmp_path):
    from pipelines.records import BadSequence
    from pipelines.sources.cmu import parse_asf

    bone = "begin\n id {i}\n name {n}\n direction 0 1 0\n length 1\n axis 0 0 0 XYZ\nend\n"
    text = (":units\n length 0.45\n angle deg\n:root\n order TX TY TZ RX RY RZ\n axis XYZ\n:bonedata\n"
            + bone.format(i=1, n="a") + bone.format(i=2, n="b")
            + ":hierarchy\n begin\n root a\n a b\n b a\n end\n")
    (tmp_path / "c.asf").write_text(text)
    with pytest.raises(BadSequence, match="cycle|two parents"):
        parse_asf(tmp_path / "c.asf")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("edit,reason", [
    (("CHANNELS 3 Zrotation Xrotation Yrotation", "CHANNELS 3 Zrotation Wrotation Yrotation"), "unknown channel"),
    (("Frame Time: 0.0333333", "Frame Time: nan"), "Frame Time"),
    (("Frame Time: 0.0333333", "Frame Time: inf"), "Frame Time"),
    (("Frame Time: 0.0333333", "Frame Time: 0"), "Frame Time"),
    (("Frame Time: 0.0333333", "Frame Time: 1e9"), "Frame Time"),
    (("OFFSET -10 0 0", "OFFSET nan 0 0"), "OFFSET"),
])
def test_bvh_bad_fields_quarantine_with_reason(tmp_path, edit, reason):
    d = tmp_path / "bvh" / "s"
    d.mkdir(parents=True)
    text = _bvh_text()
    assert edit[0] in text
    (d / "x.bvh").write_text(text.replace(edit[0], edit[1], 1))
    m = build_shards("bvh", out=tmp_path / "o", frames=27, input=str(tmp_path / "bvh"), n_cameras=1,
                     test_subjects=[])
    assert m["sequences_quarantined"] == 1 and reason in m["quarantine"][0]["reason"]
    assert "x.bvh" in m["quarantine"][0]["reason"]


@pytest.mark.timeout(60)
def test_bvh_zero_frames_and_deep_nesting(tmp_path):
    from pipelines.records import BadSequence
    from pipelines.sources.bvh import parse_bvh

    zero = _bvh_text(frames=0)
    (tmp_path / "zero.bvh").write_text(zero)
    with pytest.raises(BadSequence, match="Frames: 0"):
        parse_bvh(tmp_path / "zero.bvh")
    deep = "HIERARCHY\n" + "".join(f"JOINT j{i}\n{{\nOFFSET 0 1 0\nCHANNELS 3 Xrotation Yrotation Zrotation\n"
                                   for i in range(5000)) + "}\n" * 5000 + "MOTION\nFrames: 1\nFrame Time: 0.01\n"
    (tmp_path / "deep.bvh").write_text(deep)
    with pytest.raises(BadSequence, match="more than|nested"):
        parse_bvh(tmp_path / "deep.bvh")


def _npy_bytes(header_shape: tuple, descr: str = "<f8", payload: bytes = b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": header_shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


@pytest.mark.timeout(60)
def test_npz_declared_sizes_are_checked_before_allocating(tmp_path):
    import zipfile

    bomb = tmp_path / "huge_header.npz"
    with zipfile.ZipFile(bomb, "w") as zf:
        zf.writestr("positions_3d.npy", _npy_bytes((10**12, 17, 3), payload=b"\0" * 64))
    with pytest.raises(PipelineError, match="declares shape"):
        load_npz(bomb)
    inflate = tmp_path / "zip_bomb.npz"
    with zipfile.ZipFile(inflate, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("positions_3d.npy", "w", force_zip64=True) as f:
            f.write(_npy_bytes((64 << 20,), "|u1"))
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
    assert inflate.stat().st_size < 1 << 20
    with pytest.raises(PipelineError, match="zip bomb"):
        load_npz(inflate)


def test_npz_pickle_must_be_an_object_array(tmp_path):
    import io
    import zipfile

    nested: list = []
    for _ in range(30):  # 2**30 leaves as a tree, a few hundred bytes as a pickle (shared references)
        nested = [nested, nested]
    buf = io.BytesIO()
    pickle.dump(nested, buf, protocol=3)
    with zipfile.ZipFile(tmp_path / "p.npz", "w") as zf:
        zf.writestr("positions_3d.npy", _npy_bytes((), "|O", buf.getvalue()))
    assert (tmp_path / "p.npz").stat().st_size < 2000
    with pytest.raises(PipelineError, match="expands to over|expected the object array"):
        load_npz(tmp_path / "p.npz")


def test_an_unexpected_reader_exception_quarantines_one_sequence(tmp_path, monkeypatch):
    from pipelines.sources.h36m import H36MSource

    path = _save_h36m(tmp_path / "x.npz", {"S1": {"Walking": _walk(), "Bad": _walk()}})
    real = H36MSource.load

    def load(self, key, cfg):
        if key["action"] == "Bad":
            raise TypeError("a check the reader forgot")
        return real(self, key, cfg)

    monkeypatch.setattr(H36MSource, "load", load)
    m = build_shards("h36m", out=tmp_path / "o", frames=27, input=path, train_subjects=["S1"], test_subjects=[])
    assert m["sequences_written"] == 4 and m["sequences_quarantined"] == 4
    assert all("unreadable (TypeError: a check the reader forgot)" in q["reason"] for q in m["quarantine"])
    monkeypatch.setattr(H36MSource, "plan", lambda self, cfg: {}["no such key"])
    with pytest.raises(PipelineError, match="not readable as h36m input"):
        build_shards("h36m", out=tmp_path / "o2", frames=27, input=path)


def test_pickle_expansion_is_refused_before_unpickling():
    """A tuple tree of 2**40 leaves used as a dict key would be hashed leaf by leaf while unpickling (hours, in C
    code no alarm interrupts): the opcode scan refuses it first; numpy's own object-array pickles pass."""
    import time

    from pipelines.records import PipelineError
    from pipelines.safe_npz import check_pickle_expansion
    from tests.test_fuzz_readers import tuple_key_bomb_pickle

    start = time.perf_counter()
    with pytest.raises(PipelineError, match="expands to over"):
        check_pickle_expansion(tuple_key_bomb_pickle(), "bomb.npz: member positions_3d.npy")
    assert time.perf_counter() - start < 5
    check_pickle_expansion(tuple_key_bomb_pickle(depth=10), "small")  # 2**10 leaves: fine
    check_pickle_expansion(pickle.dumps(np.array({"S1": {"Walking": np.zeros((5, 32, 3))}}, dtype=object), 3), "ok")
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        check_pickle_expansion(tuple_key_bomb_pickle(depth=10)[:-3], "cut")
