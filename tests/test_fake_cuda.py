"""Device mistakes caught without a GPU: every model, the training step and the evaluation step "on an accelerator".

Two honest stand-ins, because this torch build has no CUDA:
- the `meta` device (shapes and dtypes, no data) runs every registered model x TPM x TRM, forward in both modes,
  backward and an AdamW step; an op that mixes a meta tensor with a CPU tensor raises, as CUDA would.
- torch's FakeTensorMode holds tensors on a fake `cuda` device and raises FakeTensorDeviceMismatchError when an op
  mixes devices. On a CPU-only build it cannot create autograd leaves on CUDA nor run Python indexing with a device
  guard (the pruning modules, the losses and flip_pose use it), so it runs the full MixSTE's forward and
  `eval_batch` without test-time flip; the meta device covers the rest.
Values are never checked here (there are none); tests/test_train_step.py checks them on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from h2ot.config import ModelConfig
from h2ot.engine import StepSettings, eval_batch, train_step
from h2ot.models import MODEL_REGISTRY, build_model
from h2ot.pruning import TPM_REGISTRY
from h2ot.recovery import TRM_REGISTRY

PRUNABLE = [name for name in MODEL_REGISTRY if name != "mlp"]  # the per-frame MLP has no frame tokens
FRAMES = 27


def small_cfg(backbone: str, **kw) -> ModelConfig:
    base = dict(backbone=backbone, frames=FRAMES, dim=32, depth=3, heads=2, mlp_ratio=2.0, schedule=[])
    if backbone == "dstformer":
        base["in_channels"] = 3
    return ModelConfig(**{**base, **kw})


def cpu_batch(cfg: ModelConfig, b: int = 2) -> dict[str, torch.Tensor]:
    """A batch as the data loader hands it over: on the CPU, in the shard schema."""
    g = torch.Generator().manual_seed(0)
    return {"pose_2d": torch.randn(b, cfg.frames, cfg.joints, 2, generator=g), "conf_2d": torch.ones(b, cfg.frames,
            cfg.joints), "pose_3d": torch.randn(b, cfg.frames, cfg.joints, 3, generator=g),
            "valid": torch.ones(b, cfg.frames)}


def configs() -> list[ModelConfig]:
    out = [small_cfg(b) for b in sorted(MODEL_REGISTRY)]
    out += [small_cfg(b, schedule=[[1, 13], [2, 5]], tpm=t, trm=r) for b in PRUNABLE for t in sorted(TPM_REGISTRY)
            for r in sorted(TRM_REGISTRY)]
    out += [small_cfg(b, schedule=[[1, 13], [2, 5]], seq2frame=True) for b in PRUNABLE]
    return out


@pytest.mark.parametrize("cfg", configs(), ids=lambda c: f"{c.backbone}-{c.tpm}-{c.trm}-{c.schedule}"
                         f"{'-s2f' if c.seq2frame else ''}")
def test_every_model_trains_and_predicts_on_a_device_without_touching_the_cpu(cfg: ModelConfig) -> None:
    model = build_model(cfg).to("meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = cpu_batch(cfg)
    loss = train_step(model, batch, optimizer, scaler, StepSettings(in_channels=cfg.in_channels),
                      torch.Generator().manual_seed(0))
    assert loss.device.type == "meta" and loss.shape == ()
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, cfg.frames, cfg.joints, cfg.in_channels, device="meta"))
    assert out.pose_3d.device.type == "meta" and out.frame_indices.device.type == "meta"
    assert all(k.device.type == "meta" for k in out.kept_indices)


def test_the_meta_stand_in_does_raise_on_device_mixing() -> None:
    cfg = small_cfg("mixste")
    model = build_model(cfg).to("meta")
    with pytest.raises(RuntimeError, match="device"):
        model(torch.zeros(1, cfg.frames, cfg.joints, 2))  # a CPU input to a device model: what _log_final did


def fake_cuda(model: nn.Module) -> nn.Module:
    """Replace every parameter and buffer by an empty fake tensor on `cuda` (call inside FakeTensorMode).
    Random initialisation is impossible there, and autograd leaves on fake CUDA need a CUDA build, so the
    parameters do not require grad."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cuda"),
                                                        requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cuda")
    return model


def test_forward_and_evaluation_step_on_fake_cuda_move_the_batch_and_return_cpu_results() -> None:
    cfg = small_cfg("mixste")
    model = build_model(cfg)
    with FakeTensorMode():
        model = fake_cuda(model)
        batch = cpu_batch(cfg)
        with pytest.raises(FakeTensorDeviceMismatchError):
            model(batch["pose_2d"])  # the mistake the steps must not make
        out = model.train()(batch["pose_2d"].to(next(model.parameters()).device))
        assert out.pose_3d.device.type == "cuda" and out.frame_indices.device.type == "cuda"
        pred, target, valid, frames = eval_batch(model.eval(), batch, cfg.in_channels, test_flip=False)
        assert {t.device.type for t in (pred, target, valid, frames)} == {"cpu"}
        assert pred.shape == (2, FRAMES, 17, 3) and pred.dtype == torch.float32
