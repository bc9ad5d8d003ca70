"""Training with Ray Train: a 2-worker DDP run, fault tolerance, resume, job submission; and the fast checks.

One fixture (`ray_env`) owns every Ray set-up of this module: its own HOME and temp dir, token auth switched
off explicitly (RAY_AUTH_MODE=disabled), so the tests do not depend on a ~/.ray/auth_token some earlier
`ray.init()` or `ray start` left behind, nor on their order. The end-to-end tests are `slow` (each starts Ray:
about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import write_tiny_shards

from jobs.settings import load_train_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """Environment for every Ray process of this module: own HOME / temp dir, auth mode explicit."""
    home = tmp_path_factory.mktemp("home")
    ray_tmp = Path("/tmp") / f"h2ot-rt-{os.getpid()}"  # Ray's socket paths must stay short
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_MODE", "RAY_TRAIN_ENABLE_PRINT_PATCH",
                                            "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    os.environ.update(HOME=str(home), RAY_AUTH_MODE="disabled", RAY_TRAIN_ENABLE_PRINT_PATCH="0")
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        os.environ.pop(k, None)
    yield {"home": home, "ray_tmp": ray_tmp}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local_ray(ray_env):
    import ray

    ray.init(address="local", num_cpus=2, _temp_dir=str(ray_env["ray_tmp"]), include_dashboard=False,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), frames=27, n_train=256, n_test=48)


def tiny_cfg(*overrides: str):
    return load_train_config(TINY, list(overrides))


def mlflow_history(run_dir: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------- fast
def test_mismatched_window_length_is_refused_before_ray_starts(tmp_path, capsys) -> None:
    from jobs import train

    f9 = write_tiny_shards(tmp_path / "f9", frames=9, n_train=8, n_test=4, files_per_split=1)
    rc = train.main(["--config", str(TINY), "--data", str(f9), "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "9 frames" in err and "model.frames is 27" in err


def test_cosine_schedule_warms_up_decays_to_zero_and_resumes() -> None:
    import torch

    from jobs.lr_schedules import build_lr_scheduler

    ocfg = tiny_cfg("optim.lr_schedule=cosine", "optim.warmup_steps=4", "optim.epochs=2",
                    "optim.steps_per_epoch=10", "optim.lr=0.1").optim
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ocfg.lr)
    sched, per_step = build_lr_scheduler(opt, ocfg)
    assert per_step
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # warm-up
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then never rises
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)  # 0 at the run's last step
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ocfg.lr)
    resumed, _ = build_lr_scheduler(opt2, ocfg)
    state = {"last_epoch": 10, "_step_count": 11, "base_lrs": [0.1], "_last_lr": [lrs[10]]}
    resumed.load_state_dict({**sched.state_dict(), **state})
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[11])


def test_cosine_schedule_needs_a_step_cap_and_unknown_schedules_are_named() -> None:
    import torch

    from jobs.lr_schedules import build_lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_lr_scheduler(opt, tiny_cfg("optim.lr_schedule=cosine", "optim.steps_per_epoch=null").optim)
    with pytest.raises(ValueError, match="optim.lr_schedule"):
        build_lr_scheduler(opt, tiny_cfg("optim.lr_schedule=linear").optim)


def test_tracking_uri_env_wins_else_absolute_sqlite(tmp_path, monkeypatch) -> None:
    from jobs.tracking import run_name, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri("rel/run")
    assert uri == f"sqlite:///{(tmp_path / 'rel/run/mlflow.db').resolve()}" and uri.startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri("rel/run") == "http://127.0.0.1:5000"
    from h2ot.config import to_dict

    assert run_name(to_dict(tiny_cfg()), "/data/h36m_f27") == "mixste-d32x2-f27-b1n9-h36m_f27-s0"


# ------------------------------------------------------------------------------------------- slow (Ray)
@pytest.mark.slow
def test_two_worker_ddp_run_then_resume_does_not_retrain(local_ray, shards, tmp_path) -> None:
    import torch

    from jobs.train import run_training

    out = tmp_path / "run"
    # 20 steps an epoch: with 6 the epoch-mean loss of this tiny model moved by less than its noise (it rose in
    # one run in three); with 20 it fell by 0.08-0.13 in every seed of a plain-loop check, against +-0.03 noise.
    cfg = tiny_cfg("optim.epochs=2", "optim.steps_per_epoch=20")
    summary = run_training(cfg, shards, out)
    assert summary["metrics"]["epoch"] == 2
    assert Path(summary["checkpoint_path"], "state.pt").is_file()
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["meta"]["manifest_hash"] and payload["meta"]["git_rev"]
    run_id = summary["mlflow"]["run_id"]
    losses = mlflow_history(out, run_id, "train/loss")
    assert [s for s, _ in losses] == [1, 2] and losses[1][1] < losses[0][1], "loss decreases"
    assert [s for s, _ in mlflow_history(out, run_id, "val/mpjpe_mm")] == [1, 2]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}").get_run(run_id)
    assert run.data.params["model.backbone"] == "mixste" and run.data.params["data.manifest_hash"]
    assert run.data.params["optim.epochs"] == "2"
    assert run.info.status == "FINISHED", "the driver ends the run it created"

    # The same run again (same name and storage): the loop sees every epoch done and trains nothing.
    before = (out / "model.pt").read_bytes()
    again = run_training(cfg, shards, out)
    assert again["return_value"] == {"resumed_finished": True, "epochs": 2}
    assert (out / "model.pt").read_bytes() == before
    assert again["mlflow"]["run_id"] == run_id
    assert [s for s, _ in mlflow_history(out, run_id, "train/loss")] == [1, 2]


@pytest.mark.slow
def test_worker_failure_resumes_from_last_checkpoint(local_ray, shards, tmp_path) -> None:
    from jobs.train import run_training

    out = tmp_path / "run"
    cfg = tiny_cfg("optim.epochs=3", "optim.steps_per_epoch=3")
    # step 4 is inside epoch 2 (steps 3-5): the first attempt dies after the epoch-1 checkpoint.
    summary = run_training(cfg, shards, out, fail_at_step=4)
    assert summary["metrics"]["epoch"] == 3 and summary["metrics"]["step"] == 9, "no epoch lost or repeated"
    history = mlflow_history(out, summary["mlflow"]["run_id"], "step")
    assert history == [(1, 3.0), (2, 6.0), (3, 9.0)]


@pytest.mark.slow
def test_a_seed_reproduces_its_run_and_every_epoch_sees_another_order(local_ray, shards, tmp_path) -> None:
    import torch

    from jobs.train import run_training, train_dataset

    def window_order(ds) -> list[float]:  # a coordinate of joint 1 in frame 0 names a window (random poses)
        return [float(first) for b in ds.iter_batches(batch_size=None) for first in b["pose_3d"][:, 0, 1, 0]]

    many_blocks = write_tiny_shards(tmp_path / "shards", n_train=256, n_test=48, files_per_split=8)
    first, again, other = (train_dataset(many_blocks, seed=s) for s in (0, 0, 1))
    epochs = [window_order(first) for _ in range(2)]
    assert [window_order(again) for _ in range(2)] == epochs, "the same seed: the same order, epoch by epoch"
    assert epochs[0] != epochs[1], "each epoch visits the blocks in another order"
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 256, "every window once an epoch"
    assert window_order(other) != epochs[0], "another seed, another order"

    # Two 2-worker runs of one seed (different names, so neither resumes the other): the same weights and scores.
    cfg = tiny_cfg("optim.epochs=2", "optim.steps_per_epoch=10")
    runs = [run_training(cfg, shards, tmp_path / name, name=name) for name in ("a", "b")]
    weights = [torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert runs[0]["metrics"]["val/mpjpe_mm"] == runs[1]["metrics"]["val/mpjpe_mm"]


@pytest.mark.slow
def test_a_named_run_with_another_config_stops_at_once_and_epochs_show_on_the_driver(local_ray, shards, tmp_path,
                                                                                   capsys) -> None:
    from jobs.train import TrainingStopped, run_training

    out, base = tmp_path / "run", ("optim.epochs=1", "optim.steps_per_epoch=2", "run.name=mine")
    run_training(tiny_cfg(*base), shards, out, mlflow=False)
    err = capsys.readouterr().err  # worker logs are silenced here (log_to_driver=False): this is the driver's line
    assert "epoch 1/1  train loss " in err and " mm  " in err and "s/epoch  ETA 0s" in err
    with pytest.raises(TrainingStopped, match="ConfigMismatch: .*another config"):  # ended, not retried 3 times
        run_training(tiny_cfg(*base, "optim.lr=0.01", "run.max_failures=3"), shards, out, mlflow=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_to_a_local_cluster(ray_env, shards, tmp_path) -> None:
    import ray

    ray.shutdown()  # the job runs on its own `ray start` cluster
    # The job's `python` is looked up on the cluster's PATH: put this interpreter's bin first, as an activated
    # virtual environment does (without it the entrypoint runs the system python, which has no torch).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": path}
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = str(ray_env["ray_tmp"]) + "-job"
    # --block: the head lives as long as this process, and stopping it stops only this cluster (`ray stop`
    # would stop every Ray on the host).
    # Every fixed default port gets a free one: another Ray on the host (a test, a run) holds the defaults, and
    # a dashboard agent that cannot bind 52365 makes every job submission fail with HTTP 500.
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port")]
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--temp-dir={temp}", "--disable-usage-stats", *ports], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = tmp_path / "run"
        cmd = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
               "--", "python", "-m", "jobs.train", "--config", "configs/tiny.yaml", "--data", str(shards),
               "--out", str(out), "--set", "optim.epochs=1", "--no-mlflow", "--json"]
        for _ in range(20):  # the job server needs a while after `ray start`; retry only while it is not up
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode == 0 or "Connection refused" not in proc.stdout + proc.stderr:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        assert (out / "model.pt").is_file()
        assert json.loads((out / "result.json").read_text())["metrics"]["epoch"] == 1
    finally:
        head.terminate()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
