"""`h2ot infer` and its parts: keypoint files (npy/npz/three JSON forms), COCO -> H36M, gap filling, sliding
windows, pictures, and one clear error (exit 2, no traceback) for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from h2ot.checkpoint import save_checkpoint
from h2ot.config import config_from_dict
from h2ot.inference import infer_sequence, plan_windows
from h2ot.keypoints import (
    KeypointError,
    coco_to_h36m,
    drop_low_scores,
    fill_gaps,
    load_keypoints,
    load_sequence,
    parse_keypoints_json,
)
from h2ot.models import build_model
from jobs.infer import main as infer_main

WIDTH, HEIGHT = 1000, 800
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIF_MAGIC = (b"GIF87a", b"GIF89a")
MIN_PICTURE_BYTES = 5_000

# A standing person in the camera frame (metres, y down), facing the camera: their right side at image left.
STANDING_H36M = np.array([
    [0, 0, 0], [-0.13, 0, 0], [-0.14, 0.45, 0], [-0.15, 0.88, 0.05], [0.13, 0, 0], [0.14, 0.45, 0],
    [0.15, 0.88, 0.05], [0, -0.23, 0], [0, -0.48, 0], [0, -0.58, -0.06], [0, -0.70, 0], [0.17, -0.45, 0],
    [0.25, -0.2, 0], [0.28, 0.05, -0.05], [-0.17, -0.45, 0], [-0.25, -0.2, 0], [-0.28, 0.05, -0.05],
])


def _tiny_cfg(**overrides):
    return config_from_dict({"kind": "model", "model": {"preset": "mixste_tiny", **overrides}}).model


def _keypoints(frames: int) -> np.ndarray:
    """A swinging-arms standing pose projected to pixels: [T, 17, 2]."""
    poses = np.repeat(STANDING_H36M[None], frames, axis=0)
    phase = np.sin(np.arange(frames) / 8.0)
    poses[:, 13, 2] -= 0.3 * phase
    poses[:, 16, 2] += 0.3 * phase
    cam = poses + [0.0, 0.0, 4.0]
    return np.stack([cam[..., 0] / cam[..., 2] * 1000 + WIDTH / 2, cam[..., 1] / cam[..., 2] * 1000 + HEIGHT / 2], -1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", build_model(cfg), cfg)


def _run(capsys, checkpoint, input_path, out, *extra: str) -> tuple[int, str, str]:
    argv = ["--checkpoint", str(checkpoint), "--input", str(input_path), "--layout", "h36m17",
            "--width", str(WIDTH), "--height", str(HEIGHT), "--out", str(out), *extra]
    code = infer_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ end to end
def test_infer_writes_poses_and_pictures(tmp_path, capsys, checkpoint):
    frames = 40  # not a multiple of the 27-frame window
    np.save(tmp_path / "kp.npy", _keypoints(frames))
    code, out, err = _run(capsys, checkpoint, tmp_path / "kp.npy", tmp_path / "a", "--json",
                          "--animation", "gif", "--animation-frames", "8")
    assert code == 0, err
    assert "frames/s" in out
    poses = np.load(tmp_path / "a" / "poses_3d.npz")["poses_3d"]
    assert poses.shape == (frames, 17, 3)
    assert np.isfinite(poses).all()
    np.testing.assert_allclose(poses[:, 0], 0.0, atol=1e-6)  # root-relative
    doc = json.loads((tmp_path / "a" / "poses_3d.json").read_text())
    assert np.asarray(doc["poses_3d"]).shape == (frames, 17, 3) and len(doc["joint_names"]) == 17
    for name in ("input_output.png", "kept_frames.png"):
        data = (tmp_path / "a" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > MIN_PICTURE_BYTES, name
    gif = (tmp_path / "a" / "skeleton.gif").read_bytes()
    assert gif.startswith(GIF_MAGIC) and len(gif) > MIN_PICTURE_BYTES

    code, _, err = _run(capsys, checkpoint, tmp_path / "kp.npy", tmp_path / "b", "--no-pictures")
    assert code == 0, err
    again = np.load(tmp_path / "b" / "poses_3d.npz")["poses_3d"]
    np.testing.assert_array_equal(poses, again)


def test_cli_dispatches_infer():
    from jobs.cli import SUBCOMMANDS

    assert SUBCOMMANDS["infer"][0] == "jobs.infer"


# ------------------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("frames", [1, 5, 26, 27, 28, 40, 100])
@pytest.mark.parametrize("stride", [None, 1, 9, 27])
def test_windows_cover_every_frame(frames, stride):
    plan = plan_windows(frames, 27, stride)
    padded = frames + plan.pad_left + plan.pad_right
    assert padded >= 27 and plan.starts[0] == 0 and plan.starts[-1] == padded - 27
    covered = np.zeros(frames, dtype=int)
    for w in range(len(plan.starts)):
        covered[plan.sequence_frames(w, np.arange(27))] += 1
    assert (covered > 0).all()


def test_stride_out_of_range():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(40, 27, 28)


@pytest.mark.parametrize("seq2frame", [False, True])
@pytest.mark.parametrize("frames", [5, 12])
def test_infer_sequence_shapes_and_kept_frames(seq2frame, frames):
    torch.manual_seed(0)
    cfg = _tiny_cfg(seq2frame=seq2frame)
    model = build_model(cfg)
    x = (np.random.default_rng(0).standard_normal((frames, 17, 2)) * 0.2).astype(np.float32)
    result = infer_sequence(model, cfg, x, batch_size=8)
    assert result.poses_3d.shape == (frames, 17, 3)
    assert len(result.kept_positions) == len(result.plan.starts)
    assert result.stage_tokens == [9] and result.stage_blocks == [1]
    for kept in result.kept_positions:
        assert kept[0].shape == (9,) and (np.diff(kept[0]) > 0).all()
        if seq2frame:
            assert 27 // 2 in kept[0]  # the centre frame is always kept
    no_flip = infer_sequence(model, cfg, x, test_flip=False)
    assert not np.allclose(no_flip.poses_3d, result.poses_3d)


def test_window_model_input_mismatch():
    cfg = _tiny_cfg()
    with pytest.raises(ValueError, match=r"\[T, 17, 2\]"):
        infer_sequence(build_model(cfg), cfg, np.zeros((10, 17, 3), np.float32))


# ------------------------------------------------------------------------------------------------ COCO -> H36M
def test_coco_to_h36m_hand_made_pose():
    coco = np.zeros((17, 3))
    coco[:, 2] = 0.9
    coco[0] = [100, 50, 0.8]  # nose
    coco[1], coco[2] = [104, 46, 0.9], [96, 46, 0.7]  # l_eye, r_eye
    coco[3], coco[4] = [110, 48, 0.5], [90, 48, 0.3]  # l_ear, r_ear
    coco[5], coco[6] = [120, 80, 0.9], [80, 80, 0.6]  # l_shoulder, r_shoulder
    coco[7], coco[8] = [125, 110, 0.9], [75, 110, 0.9]
    coco[9], coco[10] = [127, 140, 0.9], [73, 140, 0.9]
    coco[11], coco[12] = [112, 160, 0.95], [88, 160, 0.4]  # l_hip, r_hip
    coco[13], coco[14] = [113, 210, 0.9], [87, 210, 0.9]
    coco[15], coco[16] = [114, 260, 0.9], [86, 260, 0.9]
    h36m = coco_to_h36m(coco[None])[0]
    np.testing.assert_allclose(h36m[0], [100, 160, 0.4])  # pelvis: mid-hips, min score
    np.testing.assert_allclose(h36m[8], [100, 80, 0.6])  # thorax: mid-shoulders
    np.testing.assert_allclose(h36m[7], [100, 120, 0.4])  # spine: mid pelvis-thorax, min of hips+shoulders
    np.testing.assert_allclose(h36m[9], [100, 57.5, 0.6])  # neck/nose: nose + (thorax - nose) / 4
    # head: centre of eyes+ears (100, 47) + (eyes (100, 46) - nose (100, 50)) = (100, 43); mean face score
    np.testing.assert_allclose(h36m[10], [100, 43, np.mean([0.8, 0.9, 0.7, 0.5, 0.3])])
    np.testing.assert_allclose(h36m[1], coco[12])  # r_hip
    np.testing.assert_allclose(h36m[6], coco[15])  # l_ankle
    np.testing.assert_allclose(h36m[13], coco[9])  # l_wrist
    np.testing.assert_allclose(h36m[14], coco[6])  # r_shoulder
    assert h36m[10, 1] < h36m[9, 1] < h36m[8, 1] < h36m[7, 1] < h36m[0, 1]  # head above neck above ... pelvis


def test_coco_head_without_ears():
    coco = np.zeros((17, 2))
    coco[0], coco[1], coco[2] = [100, 50], [104, 46], [96, 46]
    coco[3:5] = np.nan  # ears not detected (profile)
    head = coco_to_h36m(coco[None])[0, 10]
    np.testing.assert_allclose(head, [100, 42])  # eyes (100, 46) + (eyes - nose) (0, -4)


def test_coco_to_h36m_without_scores():
    out = coco_to_h36m(np.random.default_rng(0).random((4, 17, 2)))
    assert out.shape == (4, 17, 2)


# ------------------------------------------------------------------------------------------------ files
def _frames_2d(frames: int = 3) -> list:
    return _keypoints(frames).round(2).tolist()


def test_json_form_a_list_of_frames(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(_frames_2d()))
    kp = load_keypoints(path)
    assert kp.shape == (3, 17, 2)
    np.testing.assert_allclose(kp, np.asarray(_frames_2d()))


def test_json_form_b_objects_with_keypoints():
    frames = _frames_2d()
    data = [{"frame": 0, "keypoints": [p + [0.9] for p in frames[0]]},
            {"frame": 1, "keypoints": frames[1], "keypoint_scores": [0.5] * 17},
            {"frame": 2, "keypoints": [v for p in frames[2] for v in p + [2]]}]  # COCO's flat x, y, v
    kp = parse_keypoints_json(data)
    assert kp.shape == (3, 17, 3)
    np.testing.assert_allclose(kp[1, :, 2], 0.5)
    np.testing.assert_allclose(kp[2, :, :2], np.asarray(frames[2]))


def test_json_form_c_mmpose_most_confident_person():
    frames = _frames_2d(4)
    other = (np.asarray(frames[0]) + 300).tolist()

    def inst(kp, score):
        return {"keypoints": kp, "keypoint_scores": [score] * 17, "bbox": [0, 0, 1, 1]}

    data = [{"frame_id": 0, "instances": [inst(other, 0.3), inst(frames[0], 0.9)]},
            {"frame_id": 1, "instances": [inst(frames[1], 0.8), inst(other, 0.2)]},
            {"frame_id": 2, "instances": []},  # nobody detected: a missing frame, interpolated later
            {"frame_id": 3, "instances": [inst(frames[3], 0.7)]}]
    kp = parse_keypoints_json(data)
    assert kp.shape == (4, 17, 3)
    np.testing.assert_allclose(kp[0, :, :2], np.asarray(frames[0]))
    np.testing.assert_allclose(kp[1, :, 2], 0.8)
    assert np.isnan(kp[2]).all()
    filled, count = fill_gaps(kp)
    assert count == 17
    np.testing.assert_allclose(filled[2, :, :2], (kp[1, :, :2] + kp[3, :, :2]) / 2)
    wrapped = parse_keypoints_json({"meta_info": {}, "instance_info": data})
    np.testing.assert_array_equal(np.isnan(wrapped), np.isnan(kp))


def test_npz_key_or_only_array(tmp_path):
    kp = _keypoints(6)
    np.savez(tmp_path / "one.npz", whatever=kp)
    np.savez(tmp_path / "named.npz", keypoints=kp, other=np.zeros(3))
    np.testing.assert_allclose(load_keypoints(tmp_path / "one.npz"), kp)
    np.testing.assert_allclose(load_keypoints(tmp_path / "named.npz"), kp)
    np.savez(tmp_path / "two.npz", a=kp, b=kp)
    with pytest.raises(KeypointError, match="none is named 'keypoints'"):
        load_keypoints(tmp_path / "two.npz")


def test_pickled_arrays_are_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(KeypointError, match="pickled"):
        load_keypoints(tmp_path / "obj.npy")


def test_short_gap_interpolated_linearly_long_gap_refused():
    kp = np.tile(np.arange(20, dtype=float)[:, None, None], (1, 17, 2))
    kp[5:8, 3] = np.nan
    kp[0:2, 4] = np.nan  # at the start: the first valid value is repeated
    filled, count = fill_gaps(kp, max_gap=3)
    assert count == 5
    np.testing.assert_allclose(filled[5:8, 3, 0], [5, 6, 7])
    np.testing.assert_allclose(filled[0:2, 4, 0], [2, 2])
    with pytest.raises(KeypointError, match=r"joint 3 \(r_ankle\) is missing \(NaN\) in frames 5-7"):
        fill_gaps(kp, max_gap=2)


def test_low_scores_become_gaps():
    kp = np.concatenate([np.tile(np.arange(6.0)[:, None, None], (1, 17, 2)), np.ones((6, 17, 1))], axis=-1)
    kp[2, 5, 2] = 0.1
    dropped = drop_low_scores(kp, 0.3)
    assert np.isnan(dropped[2, 5, :2]).all() and np.isfinite(np.delete(dropped, 5, axis=1)).all()
    filled, count = fill_gaps(dropped)
    assert count == 1 and filled[2, 5, 0] == 2.0
    np.testing.assert_array_equal(drop_low_scores(kp[..., :2], 0.3), kp[..., :2])  # no score channel: unchanged


def test_load_sequence_converts_coco(tmp_path):
    np.save(tmp_path / "coco.npy", np.random.default_rng(0).random((8, 17, 3)) * 500)
    kp, filled = load_sequence(tmp_path / "coco.npy", "coco17")
    assert kp.shape == (8, 17, 3) and filled == 0


# ------------------------------------------------------------------------------------------------ bad inputs
def _write_bad(tmp_path, kind: str):
    good = _keypoints(30)
    if kind == "joints":
        np.save(tmp_path / "x.npy", np.zeros((30, 18, 2)))
    elif kind == "channels":
        np.save(tmp_path / "x.npy", np.zeros((30, 17, 4)))
    elif kind == "one_pose":
        np.save(tmp_path / "x.npy", good[0])
    elif kind == "nan_long":
        good[4:20, 13] = np.nan
        np.save(tmp_path / "x.npy", good)
    elif kind == "nan_all":
        np.save(tmp_path / "x.npy", np.full((30, 17, 2), np.nan))
    elif kind == "empty_npy":
        np.save(tmp_path / "x.npy", np.zeros((0, 17, 2)))
    elif kind == "empty_json":
        (tmp_path / "x.json").write_text("[]")
        return tmp_path / "x.json"
    elif kind == "ragged_json":
        (tmp_path / "x.json").write_text(json.dumps([good[0].tolist(), good[1].tolist()[:10]]))
        return tmp_path / "x.json"
    elif kind == "bad_json":
        (tmp_path / "x.json").write_text("[[1, 2], ")
        return tmp_path / "x.json"
    elif kind == "garbage_npz":
        (tmp_path / "x.npz").write_bytes(b"not a zip file at all")
        return tmp_path / "x.npz"
    elif kind == "missing":
        return tmp_path / "nope.npy"
    elif kind == "suffix":
        (tmp_path / "x.csv").write_text("1,2\n")
        return tmp_path / "x.csv"
    return tmp_path / "x.npy"


@pytest.mark.parametrize("kind, message", [
    ("joints", "18 joints per frame, expected 17"),
    ("channels", "4 channels per joint"),
    ("one_pose", "got one pose of shape [17, 2]"),
    ("nan_long", "joint 13 (l_wrist) is missing (NaN) in frames 4-19"),
    ("nan_all", "every keypoint is missing"),
    ("empty_npy", "empty input"),
    ("empty_json", "no frames"),
    ("ragged_json", "frame 1 has shape [10, 2]"),
    ("bad_json", "not valid JSON"),
    ("garbage_npz", "not a readable .npz file"),
    ("missing", "no such file"),
    ("suffix", "unknown keypoint file type '.csv'"),
])
def test_bad_input_gives_one_clear_error(tmp_path, capsys, checkpoint, kind, message):
    code, _, err = _run(capsys, checkpoint, _write_bad(tmp_path, kind), tmp_path / "out")
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out" / "poses_3d.npz").exists()


@pytest.mark.parametrize("drop, message", [(["--width", str(WIDTH)], "missing image size: give --width"),
                                           (["--height", str(HEIGHT)], "give --height")])
def test_missing_image_size(tmp_path, capsys, checkpoint, drop, message):
    np.save(tmp_path / "kp.npy", _keypoints(10))
    argv = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "kp.npy"), "--layout", "h36m17",
            "--width", str(WIDTH), "--height", str(HEIGHT), "--out", str(tmp_path / "out")]
    i = argv.index(drop[0])
    del argv[i : i + 2]
    assert infer_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_cuda_without_gpu(tmp_path, capsys, checkpoint):
    np.save(tmp_path / "kp.npy", _keypoints(10))
    code, _, err = _run(capsys, checkpoint, tmp_path / "kp.npy", tmp_path / "out", "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


def test_unreadable_checkpoint(tmp_path, capsys):
    np.save(tmp_path / "kp.npy", _keypoints(10))
    (tmp_path / "model.pt").write_bytes(b"garbage")
    code, _, err = _run(capsys, tmp_path / "model.pt", tmp_path / "kp.npy", tmp_path / "out")
    assert code == 2 and "cannot load the model" in err and "Traceback" not in err and err.count("\n") == 1
    code, _, err = _run(capsys, tmp_path / "absent.pt", tmp_path / "kp.npy", tmp_path / "out")
    assert code == 2 and "no such file" in err


# ------------------------------------------------------------------------------- crafted inputs (issue 17)
def _npy_header_only(shape: tuple, descr: str = "<f8") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, content, message", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested"),
    ("deep_obj.json", '{"keypoints": ' * 50_000 + "1" + "}" * 50_000, "nested"),
    ("fields.json", json.dumps({"instance_info": [{"instances": [{"keypoints": [[1, 2]] * 17,
                                                                   "bbox_score": [1]}]}]}), "bbox_score"),
    ("kp_dict.json", json.dumps([{"keypoints": {"x": 1}}]), "keypoints must be numbers"),
    ("kp_text.json", json.dumps([{"keypoints": "abc"}]), "keypoints must be numbers"),
    ("scores.json", json.dumps([{"keypoints": [[1, 2]] * 17, "keypoint_scores": "high"}]), "must be numbers"),
    ("huge_int.json", '[[' + ",".join(["[1" + "0" * 400 + ", 2]"] * 17) + "]]", "too large"),
    ("absurd.json", json.dumps([[[1e300, 5.0]] * 17] * 3), "absurd value"),
    ("huge.npy", _npy_header_only((10**12, 17, 2)), "declares shape"),
    ("text.npy", _npy_header_only((3, 17, 2), "<U4") + b"\0" * (3 * 17 * 2 * 16), "expected numbers"),
])
def test_crafted_keypoint_files_give_one_line(tmp_path, capsys, checkpoint, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = _run(capsys, checkpoint, path, tmp_path / "out")
    assert code == 2 and message in err, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1


def test_crafted_npz_keypoints_are_bounded(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("keypoints.npy", "w", force_zip64=True) as f:
            f.write(_npy_header_only((64 << 20,), "|u1"))
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
    with pytest.raises(KeypointError, match="zip bomb"):
        load_keypoints(tmp_path / "bomb.npz")
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as zf:
        zf.writestr("keypoints.npy", _npy_header_only((10**12, 17, 3)))
    with pytest.raises(KeypointError, match="declares shape"):
        load_keypoints(tmp_path / "big.npz")
