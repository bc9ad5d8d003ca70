"""The GPU check's CPU-side logic: its plan parses with the jobs' own parsers and configs; without CUDA it stops at
its first step with a clear message."""

from __future__ import annotations

import json

import pytest
import torch

from jobs import gpu_check


def test_the_plan_is_valid_for_the_jobs_it_runs(tmp_path) -> None:
    from jobs import eval as eval_job
    from jobs import train
    from jobs.settings import load_train_config

    steps = dict(gpu_check.plan(tmp_path, steps_per_epoch=150, epochs=2))
    assert list(steps) == ["cuda", "preprocess", "train", "eval", "bench_b1", "bench_b64"]
    args = train.parse_args(steps["train"][steps["train"].index("train") + 1:])
    cfg = load_train_config(gpu_check.REPO / args.config, args.overrides)
    assert cfg.model.frames == 243 and cfg.model.dim == 512 and cfg.model.schedule, "the paper-size H2OT model"
    assert cfg.optim.amp and cfg.scaling.use_gpu is True and cfg.scaling.num_workers == 1
    assert cfg.optim.epochs * cfg.optim.steps_per_epoch == 300
    eval_args = eval_job.parse_args(steps["eval"][steps["eval"].index("eval") + 1:])
    assert eval_args.device == "cuda" and eval_args.checkpoint.endswith("model.pt")
    for name, batch in (("bench_b1", "1"), ("bench_b64", "64")):
        cmd = steps[name]
        assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--batch") + 1] == batch


def test_dry_run_prints_every_command(tmp_path, capsys) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["cuda", "preprocess", "train", "eval", "bench_b1", "bench_b64"]
    assert not (tmp_path / "out").exists()


def test_without_cuda_the_check_stops_at_its_first_step(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "step cuda failed" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["cuda"] and report["steps"]["cuda"]["rc"] != 0
    assert "torch sees no CUDA device" in (tmp_path / "out" / "cuda.log").read_text()
