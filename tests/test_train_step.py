"""The one training step and evaluation batch (h2ot.engine), and the GPU-path pieces of the train loop, without Ray:
collectives on the worker's device, the AMP scaler across devices, use_gpu from declared capacity, fp16 attention,
FLOPs counted by the driver, divergence and another run's checkpoint stopping the run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from train_helpers import write_tiny_shards

from h2ot.config import ModelConfig, to_dict
from h2ot.engine import StepSettings, eval_batch, step_loss, train_step
from h2ot.layers import ATTENTION_RECEIVED, Attention
from h2ot.losses import pose_loss
from h2ot.models import build_model, predict
from jobs import train_loop
from jobs.evaluation import load_windows, window_batch
from jobs.settings import load_train_config

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), frames=27, n_train=16, n_test=8, files_per_split=1)


def tiny_cfg(*overrides: str):
    return load_train_config(TINY_CONFIG, list(overrides))


def batch_of(data: dict[str, np.ndarray], n: int = 4) -> dict[str, torch.Tensor]:
    return window_batch(data, slice(0, n))


# ------------------------------------------------------------------------------------------- the steps
def test_train_step_lowers_the_loss_of_a_fixed_batch(shards) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mixste", frames=27, dim=32, depth=2, heads=2, schedule=[[1, 9]])
    model = build_model(cfg)
    batch = batch_of(load_windows(shards, "train"), 8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    settings = StepSettings(flip_augment=False)
    losses = [float(train_step(model, batch, opt, scaler, settings)) for _ in range(15)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.95 * losses[0]  # 1.14 -> 1.03 on torch 2.13


def test_a_seq2frame_step_is_scored_on_the_frames_the_model_kept(shards) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mixste", frames=27, dim=32, depth=2, heads=2, schedule=[[1, 9]], seq2frame=True)
    model = build_model(cfg).train()
    batch = batch_of(load_windows(shards, "train"))
    torch.manual_seed(1)
    loss = step_loss(model, batch, StepSettings(flip_augment=False))
    torch.manual_seed(1)
    out = model(batch["pose_2d"])
    assert out.pose_3d.shape[1] == 9, "training mode outputs the kept frames"
    idx = out.frame_indices
    target = torch.stack([batch["pose_3d"][b, idx[b]] for b in range(len(idx))])
    valid = torch.stack([batch["valid"][b, idx[b]] for b in range(len(idx))])
    expected, _ = pose_loss(out.pose_3d, target, valid)
    torch.testing.assert_close(loss, expected)


def test_eval_batch_is_predict_with_flip_and_the_output_frames_targets(shards) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mixste", frames=27, dim=32, depth=2, heads=2, schedule=[[1, 9]], seq2frame=True)
    model = build_model(cfg).eval()
    batch = batch_of(load_windows(shards, "test"))
    pred, target, valid, frames = eval_batch(model, batch, 2, test_flip=True)
    with torch.no_grad():
        expected = predict(model, batch["pose_2d"], test_flip=True).pose_3d
    torch.testing.assert_close(pred, expected)
    assert frames.tolist() == [[13]] * 4, "seq2frame evaluation: the centre frame"
    torch.testing.assert_close(target, batch["pose_3d"][:, 13:14])
    assert valid.dtype == torch.bool and valid.shape == (4, 1)


def test_final_example_runs_where_the_model_lives_and_returns_numpy(shards) -> None:
    model = build_model(ModelConfig(backbone="mixste", frames=27, dim=32, depth=2, heads=2)).train()
    test = load_windows(shards, "test")
    pred, target, valid, frame = train_loop.final_example(model, test, 2)
    assert isinstance(pred, np.ndarray) and pred.shape == (17, 3) and frame == 13
    np.testing.assert_allclose(target, test["pose_3d"][0, 13])
    assert model.training, "the model's mode is restored"


# ------------------------------------------------------------------------------------------- GPU path
def test_epoch_totals_live_on_the_workers_device_as_nccl_needs(monkeypatch) -> None:
    import torch.distributed as dist

    stats = {"loss": 0.5, "clips": 64, "wait_s": 0.1, "busy_s": 0.9}
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with FakeTensorMode():
        on_gpu = train_loop.epoch_totals(stats, torch.device("cuda", 0))
        assert on_gpu.device.type == "cuda"
        train_loop.check_collective_device(on_gpu)
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            train_loop.check_collective_device(torch.zeros(4))  # what the loop reduced before: a CPU tensor
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    train_loop.check_collective_device(torch.zeros(4))


def test_an_empty_scaler_state_from_a_cpu_run_is_skipped_on_a_gpu_resume() -> None:
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # what a CPU run writes
    assert saved == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)  # stands in for the CUDA scaler
    with pytest.raises(RuntimeError):
        enabled.load_state_dict(saved)
    train_loop.restore_scaler(enabled, saved)
    assert enabled.get_scale() == 1024.0
    full = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    train_loop.restore_scaler(enabled, full)
    assert enabled.get_scale() == 8.0


def test_use_gpu_follows_declared_capacity_not_the_gpus_present_now(monkeypatch) -> None:
    import ray
    from ray._private import state

    from jobs.train import resolve_use_gpu

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # the GPU group has 0 replicas yet
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 68, "GPU": 8})
    assert resolve_use_gpu(None) is True
    assert resolve_use_gpu(False) is False
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: None)  # no autoscaler
    assert resolve_use_gpu(None) is False
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    assert resolve_use_gpu(None) is True


def test_recorded_attention_does_not_overflow_in_half_precision() -> None:
    attn = Attention(dim=128, heads=2).half()
    with torch.no_grad():
        attn.qkv.weight.fill_(1.0 / 128)
        attn.qkv.bias.zero_()
    x = torch.full((1, 4, 128), 50.0, dtype=torch.float16)  # q = k = 50 per channel: q.k = 64 * 2500 > 65504
    sink: dict = {}
    out = attn(x, sink)
    assert torch.isfinite(out).all() and torch.isfinite(sink[ATTENTION_RECEIVED]).all()
    torch.testing.assert_close(sink[ATTENTION_RECEIVED], torch.full((1, 4), 2 * 4 / 4.0))  # uniform attention


def test_workers_do_not_count_flops_the_driver_does(shards, monkeypatch) -> None:
    import h2ot.flops
    from jobs.train import loop_config

    cfg = tiny_cfg()
    config = loop_config(cfg, shards)
    assert config["gflops"]["gflops_linear"] > 0 and len(config["config_hash"]) == 64

    def boom(*args, **kwargs):
        raise AssertionError("a worker counted FLOPs")

    monkeypatch.setattr(h2ot.flops, "model_gflops", boom)
    w = train_loop.setup_worker(config, 0, 2, torch.device("cpu"), lambda m: m)
    assert w.settings.amp is False and not w.scaler.is_enabled()


# ------------------------------------------------------------------------------------------- runs that must stop
def test_another_configs_checkpoint_is_refused_with_a_clear_message(shards) -> None:
    from jobs.train import config_hash, loop_config, resolve_name

    cfg, other = tiny_cfg(), tiny_cfg("optim.lr=0.01")
    assert config_hash(cfg) == config_hash(tiny_cfg()) != config_hash(other)
    assert config_hash(cfg) == config_hash(tiny_cfg("scaling.num_workers=4", "run.max_failures=3"))
    assert resolve_name(cfg, shards) != resolve_name(other, shards), "the default name tells configs apart"
    assert resolve_name(cfg, shards, "mine") == "mine"
    saved = {"config_hash": config_hash(other), "manifest_hash": loop_config(cfg, shards)["manifest_hash"]}
    with pytest.raises(train_loop.ConfigMismatch, match="another config .* choose another run name"):
        train_loop.check_same_run(saved, loop_config(cfg, shards), "ray/mine/checkpoint_000000")
    train_loop.check_same_run({**saved, "config_hash": config_hash(cfg)}, loop_config(cfg, shards), "here")
    with pytest.raises(train_loop.ConfigMismatch, match="another shards"):
        train_loop.check_same_run({**saved, "config_hash": config_hash(cfg), "manifest_hash": "0" * 64},
                                  loop_config(cfg, shards), "here")


def test_a_diverged_epoch_stops_the_run(shards) -> None:
    config = {"cfg": to_dict(tiny_cfg()), "data_dir": str(shards), "gflops": {}}
    w = train_loop.setup_worker(config, 0, 1, torch.device("cpu"), lambda m: m)
    w.test = load_windows(shards, "test")
    with torch.no_grad():
        next(w.model.parameters()).fill_(float("nan"))
    stats = {"loss": float("nan"), "clips": 8, "wait_s": 0.1, "busy_s": 1.0, "steps": 1}
    with pytest.raises(train_loop.Diverged, match="epoch 1: the run diverged"):
        train_loop.validate(w, stats)
    assert issubclass(train_loop.Diverged, train_loop.NON_RETRYABLE[0])


def test_progress_line_names_epoch_loss_mpjpe_speed_and_eta() -> None:
    from jobs.progress import progress_line

    line = progress_line({"epoch": 2, "train/loss": 0.1234, "val/mpjpe_mm": 85.04}, 10, [30.0, 34.0])
    assert line == "epoch 2/10  train loss 0.1234  val MPJPE 85.0 mm  34.0 s/epoch  ETA 4m16s"
