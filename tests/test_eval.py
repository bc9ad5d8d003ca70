"""`h2ot eval`: one JSON object, the same numbers twice, MPJPE equal to a hand-computed value. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import write_tiny_shards

from h2ot.checkpoint import save_checkpoint
from h2ot.config import ModelConfig
from h2ot.models import build_model
from h2ot.skeleton import flip_pose
from jobs import eval as eval_job
from pipelines.shards import read_split

FRAMES = 27


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), frames=FRAMES, n_train=16, n_test=24)


def constant_pose_checkpoint(path, seed: int = 0) -> np.ndarray:
    """An MLP whose prediction is the same pose c [17, 3] for every frame (all weights 0, head bias = c)."""
    cfg = ModelConfig(backbone="mlp", frames=FRAMES, dim=16, depth=1, schedule=[])
    model = build_model(cfg)
    c = np.random.default_rng(seed).normal(0, 0.2, (17, 3)).astype(np.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias.copy_(torch.from_numpy(c.reshape(-1)))
    save_checkpoint(path, model, cfg, {"manifest_hash": "test"})
    return c


def run_eval(capsys, *args: str) -> dict:
    assert eval_job.main(list(args)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "exactly one JSON object on stdout"
    return json.loads(lines[0])


def test_eval_matches_hand_computed_mpjpe_and_is_repeatable(tmp_path, shards, capsys) -> None:
    c = constant_pose_checkpoint(tmp_path / "model.pt")
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--data", str(shards), "--json"]
    first, second = run_eval(capsys, *argv), run_eval(capsys, *argv)
    assert first == {**second, "clips_per_s": first["clips_per_s"]}  # timing aside, identical
    for key in ("mpjpe_mm", "p_mpjpe_mm", "mpjve_mm", "gflops", "frames", "per_action"):
        assert key in first

    test = read_split(shards, "test")
    valid = test["valid"].astype(bool)
    pred = (c + flip_pose(c)) / 2  # test-time flip of a constant prediction
    per_frame = np.linalg.norm(pred[None, None] - test["pose_3d"], axis=-1).mean(-1)  # [N, T]
    expected = per_frame[valid].mean() * 1000
    assert first["frames"] == int(valid.sum())
    assert first["mpjpe_mm"] == pytest.approx(expected, rel=1e-5)
    # a constant prediction has zero velocity: MPJVE is the mean speed of the ground truth
    steps = valid[:, 1:] & valid[:, :-1]
    speed = np.linalg.norm(np.diff(test["pose_3d"], axis=1), axis=-1).mean(-1)
    assert first["mpjve_mm"] == pytest.approx(speed[steps].mean() * 1000, rel=1e-5)
    assert set(first["per_action"]) == set(test["action"])

    no_flip = run_eval(capsys, *argv, "--no-flip")
    plain = np.linalg.norm(c[None, None] - test["pose_3d"], axis=-1).mean(-1)[valid].mean() * 1000
    assert no_flip["mpjpe_mm"] == pytest.approx(plain, rel=1e-5)


def test_eval_names_the_pruning_of_an_h2ot_checkpoint(tmp_path, shards, capsys) -> None:
    cfg = ModelConfig(backbone="frameformer", frames=FRAMES, dim=16, depth=2, heads=2, schedule=[[1, 3]],
                      trm="linear", tpm="uniform")
    save_checkpoint(tmp_path / "h2ot.pt", build_model(cfg), cfg, {"manifest_hash": "test"})
    model = run_eval(capsys, "--checkpoint", str(tmp_path / "h2ot.pt"), "--data", str(shards), "--json")["model"]
    assert model["schedule"] == [[1, 3]] and model["tpm"] == "uniform" and model["trm"] == "linear"
    constant_pose_checkpoint(tmp_path / "model.pt")
    full = run_eval(capsys, "--checkpoint", str(tmp_path / "model.pt"), "--data", str(shards), "--json")["model"]
    assert "trm" not in full  # a full model prunes nothing


def test_eval_window_length_mismatch_is_a_clear_error(tmp_path, capsys) -> None:
    other = write_tiny_shards(tmp_path / "f9", frames=9, n_train=4, n_test=4, files_per_split=1)
    constant_pose_checkpoint(tmp_path / "model.pt")
    assert eval_job.main(["--checkpoint", str(tmp_path / "model.pt"), "--data", str(other), "--json"]) == 2
    err = capsys.readouterr().err
    assert "9 frames" in err and "model.frames is 27" in err


def test_eval_missing_checkpoint(tmp_path, shards, capsys) -> None:
    assert eval_job.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(shards)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_runs_on_the_device_asked_for(tmp_path, shards, capsys) -> None:
    constant_pose_checkpoint(tmp_path / "model.pt")
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--data", str(shards), "--json"]
    assert run_eval(capsys, *argv, "--device", "cpu")["device"] == "cpu"
    if torch.cuda.is_available():
        assert run_eval(capsys, *argv, "--device", "cuda")["device"].startswith("cuda")
    else:
        assert eval_job.main([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device" in err[0] and "--device cpu" in err[0]


def one_line_error(capsys, checkpoint, shards) -> str:
    assert eval_job.main(["--checkpoint", str(checkpoint), "--data", str(shards), "--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and "Traceback" not in captured.err
    return lines[0]


def rewrite(path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_eval_refuses_nan_weights_with_one_line(tmp_path, shards, capsys) -> None:
    path = tmp_path / "model.pt"
    constant_pose_checkpoint(path)
    rewrite(path, lambda p: p["state_dict"]["head.weight"].fill_(float("nan")))
    assert "NaN or infinite" in one_line_error(capsys, path, shards)


def test_eval_refuses_a_model_that_predicts_nan_with_one_line(tmp_path, shards, capsys) -> None:
    path = tmp_path / "model.pt"
    constant_pose_checkpoint(path)
    rewrite(path, lambda p: p["state_dict"]["head.bias"].fill_(3e38))  # finite weights, overflowing output
    rewrite(path, lambda p: p["state_dict"]["head.weight"].fill_(3e38))
    assert "NaN or infinite poses" in one_line_error(capsys, path, shards)


@pytest.mark.parametrize("change, words", [
    (lambda p: p.__setitem__("model_config", ["mlp", 27]), "model_config is a list"),
    (lambda p: p["model_config"].__setitem__("dim", 24), "the weights do not fit"),
    (lambda p: p["model_config"].__setitem__("backbone", "nope"), "unknown backbone"),
    (lambda p: p.__setitem__("state_dict", {"head.weight": "text"}), "state_dict is not a mapping"),
])
def test_eval_of_an_inconsistent_checkpoint_is_one_line(tmp_path, shards, capsys, change, words) -> None:
    path = tmp_path / "model.pt"
    constant_pose_checkpoint(path)
    rewrite(path, change)
    assert words in one_line_error(capsys, path, shards)
