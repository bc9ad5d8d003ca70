"""`h2ot stream`: one pose per input frame, exactly once, in order; the same poses as offline `h2ot infer` where
the windows coincide; bad lines reported with their number and filled, never a traceback."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from h2ot.checkpoint import save_checkpoint
from h2ot.config import config_from_dict
from h2ot.inference import infer_sequence
from h2ot.keypoints import model_input
from h2ot.models import build_model
from jobs.stream import HOP_MARGIN, Streamer, _steady_rate, hop_for, lookahead, main, parse_frame

sys.path.insert(0, str(Path(__file__).parent))
from test_infer import HEIGHT, WIDTH, _keypoints  # noqa: E402

FRAMES = 27  # mixste_tiny's window


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = config_from_dict({"kind": "model", "model": {"preset": "mixste_tiny"}}).model
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    model, cfg = tiny
    return save_checkpoint(tmp_path_factory.mktemp("stream") / "model.pt", model, cfg)


def _pixels3(kp2: np.ndarray) -> np.ndarray:
    return np.concatenate([kp2, np.ones(kp2.shape[:-1] + (1,))], axis=-1)


def _stream_all(model, cfg, kp2: np.ndarray, hop: int) -> list:
    streamer = Streamer(model, cfg, WIDTH, HEIGHT, hop, test_flip=False)
    out = []
    for frame in _pixels3(kp2):
        out += streamer.push(frame)
    return out + streamer.finish()


def _offline(model, cfg, kp2: np.ndarray, stride: int) -> np.ndarray:
    x = model_input(kp2, WIDTH, HEIGHT, cfg.in_channels)
    return infer_sequence(model, cfg, x, stride=stride, test_flip=False).poses_3d


def test_stream_equals_offline_infer_where_the_windows_coincide(tiny) -> None:
    model, cfg = tiny
    kp2 = _keypoints(4 * FRAMES)
    out = _stream_all(model, cfg, kp2, hop=FRAMES)  # hop = window: back-to-back windows, as infer --stride T
    assert [e.frame for e in out] == list(range(len(kp2)))
    streamed = np.stack([e.pose_3d for e in out])
    np.testing.assert_allclose(streamed, _offline(model, cfg, kp2, stride=FRAMES), atol=1e-5)


@pytest.mark.parametrize(("hop", "frames"), [(1, 34), (6, 60), (13, 70)])
def test_each_block_is_the_middle_of_the_window_ending_at_its_trigger(tiny, hop: int, frames: int) -> None:
    model, cfg = tiny
    kp2 = _keypoints(frames)
    out = _stream_all(model, cfg, kp2, hop)
    assert [e.frame for e in out] == list(range(frames)), "every frame once, in order"
    ahead = lookahead(FRAMES, hop)
    checked = 0
    for start in range(0, frames, hop):
        end = start + hop - 1 + ahead
        if end - FRAMES + 1 < 0 or end >= frames:
            continue  # start-up padding or the flushed tail: not one offline window
        window = _offline(model, cfg, kp2[end - FRAMES + 1 : end + 1], stride=FRAMES)  # one window, no padding
        for k in range(start, min(start + hop, frames)):
            np.testing.assert_allclose(out[k].pose_3d, window[k - (end - FRAMES + 1)], atol=1e-5)
            checked += 1
    assert checked > 0


def test_start_up_padding_repeats_the_first_frame(tiny) -> None:
    model, cfg = tiny
    kp2 = _keypoints(40)
    out = _stream_all(model, cfg, kp2, hop=6)
    padded = np.concatenate([np.repeat(kp2[:1], FRAMES, axis=0), kp2])  # frame 0 repeated before the start
    end = 6 - 1 + lookahead(FRAMES, 6) + FRAMES  # first block's trigger, in the padded sequence
    window = _offline(model, cfg, padded[end - FRAMES + 1 : end + 1], stride=FRAMES)
    for k in range(6):
        np.testing.assert_allclose(out[k].pose_3d, window[k + FRAMES - (end - FRAMES + 1)], atol=1e-5)


def _lines(kp2: np.ndarray) -> list[str]:
    return [json.dumps(frame.round(2).tolist()) for frame in kp2]


def _run(monkeypatch, capsys, checkpoint, text: str, *extra: str) -> tuple[int, list[dict], str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(["--checkpoint", str(checkpoint), "--layout", "h36m17", "--width", str(WIDTH), "--height",
                 str(HEIGHT), "--hop", "5", "--fps", "5", "--no-flip", *extra])  # a hop of 1 s: no slowness warning
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_bad_lines_are_reported_filled_and_the_stream_goes_on(monkeypatch, capsys, checkpoint) -> None:
    lines = _lines(_keypoints(40))
    nan_frame = json.loads(lines[7])
    nan_frame[3] = [float("nan"), float("nan")]
    lines[7] = json.dumps(nan_frame)  # json writes NaN literals, as Python detectors do
    lines[3] = "{not json"
    lines[10] = json.dumps(json.loads(lines[10])[:12])  # 12 joints
    lines[12] = "null"  # no person
    lines.insert(20, "")  # a blank line: not a frame
    text = "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]  # abrupt end mid-line, no newline
    code, out, err = _run(monkeypatch, capsys, checkpoint, text)
    assert code == 0 and "Traceback" not in err
    frames = len(lines) - 1  # the blank one is not a frame
    assert [o["frame"] for o in out] == list(range(frames)), "every frame answered once, in order"
    assert all(np.isfinite(np.asarray(o["pose_3d"])).all() and len(o["pose_3d"]) == 17 for o in out)
    assert "line 4: not valid JSON" in err
    assert "line 11: 12 joints per frame, expected 17" in err
    assert "line 21: blank" in err
    assert f"line {len(lines)}: not valid JSON" in err  # the cut last line
    filled = {o["frame"] for o in out if o["filled"]}
    assert {3, 7, 10, 12, frames - 1} <= filled and 0 not in filled and 5 not in filled
    assert all(o["pose_3d"][0] == [0.0, 0.0, 0.0] for o in out), "root-relative"


def test_strict_stops_at_the_first_bad_line(monkeypatch, capsys, checkpoint) -> None:
    lines = _lines(_keypoints(12))
    lines[4] = "[1, 2"
    code, out, err = _run(monkeypatch, capsys, checkpoint, "\n".join(lines) + "\n", "--strict")
    assert code == 2 and "line 5" in err and "--strict" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the start-up note and the error


def test_a_stream_without_any_person_answers_every_frame_without_a_pose(monkeypatch, capsys, checkpoint) -> None:
    code, out, err = _run(monkeypatch, capsys, checkpoint, "null\n" * 4)
    assert code == 0 and [o["frame"] for o in out] == [0, 1, 2, 3] and all(o["pose_3d"] is None for o in out)


def test_parse_frame_accepts_the_per_frame_forms_of_infer() -> None:
    frame = _keypoints(1)[0]
    as_list = parse_frame(json.dumps(frame.tolist()), 1, "h36m17")
    as_object = parse_frame(json.dumps({"keypoints": frame.tolist(), "keypoint_scores": [0.5] * 17}), 2, "h36m17")
    mmpose = parse_frame(json.dumps({"instances": [{"keypoints": frame.tolist(), "keypoint_scores": [0.9] * 17}]}),
                         3, "h36m17")
    np.testing.assert_allclose(as_list[:, :2], frame)
    assert as_list[:, 2].tolist() == [1.0] * 17 and as_object[:, 2].tolist() == [0.5] * 17
    np.testing.assert_allclose(mmpose[:, :2], frame)
    assert parse_frame(json.dumps({"instances": []}), 4, "h36m17") is None
    assert parse_frame(json.dumps(frame.tolist()), 5, "coco17").shape == (17, 3)


def test_stream_runs_an_exported_model(monkeypatch, capsys, checkpoint, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from jobs.export import write_onnx

    _, _, onnx_path = write_onnx(str(checkpoint), tmp_path / "model.onnx")
    text = "\n".join(_lines(_keypoints(30))) + "\n"
    code, from_torch, _ = _run(monkeypatch, capsys, checkpoint, text)
    code_onnx, from_onnx, _ = _run(monkeypatch, capsys, onnx_path, text)
    assert code == code_onnx == 0 and len(from_onnx) == 30
    np.testing.assert_allclose([o["pose_3d"] for o in from_onnx], [o["pose_3d"] for o in from_torch], atol=1e-4)


def test_bench_stream_reports_rate_latency_and_delay(checkpoint) -> None:
    from jobs.stream import bench_stream

    result = bench_stream(str(checkpoint), fps=200.0, hop=9, frames=60, test_flip=False)
    assert result["stated_delay_frames"] == lookahead(FRAMES, 9) + 9 - 1
    assert result["stated_delay_s"] == round(result["stated_delay_frames"] / 200.0, 3)
    assert result["stated_delay_plus_forward_s"] >= result["stated_delay_s"]
    assert result["sustained_fps"] > 0 and 0 <= result["latency_p50_s"] <= result["latency_p99_s"]
    assert result["forwards"] >= 60 // 9 and result["test_flip"] is False


def test_the_steady_rate_leaves_out_the_start_up_wait_and_the_flush() -> None:
    # blocks of 10 frames answered every 0.2 s from t = 3 s on (after a 3 s start-up wait): 50 frames/s
    blocks = [(10 * (m + 1), 3.0 + 0.2 * m) for m in range(5)]
    assert _steady_rate(blocks) == 50.0
    assert _steady_rate(blocks[:1]) is None, "one answer is no rate"


def test_the_default_hop_is_a_quarter_window_unless_a_forward_is_too_slow() -> None:
    assert hop_for(243, forward_s=0.5, fps=50.0) == 60  # 60 frames = 1.2 s >= 1.25 x 0.5 s
    slow = hop_for(243, forward_s=1.5, fps=50.0)
    assert slow / 50.0 >= HOP_MARGIN * 1.5 > (slow - 1) / 50.0, "the smallest hop that keeps up"
    assert hop_for(243, forward_s=10.0, fps=50.0) == 243, "never more than the window"
    assert hop_for(27, forward_s=0.001, fps=50.0) == 6


def test_a_slow_forward_raises_the_default_hop_and_says_so(monkeypatch, capsys, checkpoint) -> None:
    monkeypatch.setattr(Streamer, "warm_up", lambda self, timed=0: 0.2)  # as if one forward took 0.2 s
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(_lines(_keypoints(20))) + "\n"))
    code = main(["--checkpoint", str(checkpoint), "--layout", "h36m17", "--width", str(WIDTH), "--height",
                 str(HEIGHT), "--fps", "50", "--no-flip"])
    captured = capsys.readouterr()
    hop = hop_for(FRAMES, 0.2, 50.0)  # 13 frames: 0.26 s >= 1.25 x 0.2 s
    assert code == 0 and hop == 13 and f"hop {hop}," in captured.err
    assert [json.loads(line)["frame"] for line in captured.out.splitlines()] == list(range(20))
