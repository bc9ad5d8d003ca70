"""Registry-wide model tests: every backbone x TPM x TRM builds, runs forward + backward, returns PoseOutput."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from h2ot.config import MODEL_PRESETS, ModelConfig, config_from_dict, to_dict
from h2ot.models import MODEL_REGISTRY, PoseOutput, build_model, predict
from h2ot.pruning import TPM_REGISTRY
from h2ot.recovery import TRM_REGISTRY
from jobs.settings import load_train_config

PRUNABLE = [name for name in MODEL_REGISTRY if name != "mlp"]  # the per-frame MLP has no frame tokens


def tiny_cfg(backbone: str, **kw) -> ModelConfig:
    base = dict(backbone=backbone, frames=27, dim=32, depth=3, heads=2, mlp_ratio=2.0, schedule=[])
    if backbone == "dstformer":
        base["in_channels"] = 3
    base.update(kw)
    return ModelConfig(**base)


def check_output(out: PoseOutput, cfg: ModelConfig, batch: int) -> None:
    assert isinstance(out, PoseOutput)
    t_out = 1 if cfg.seq2frame else cfg.frames
    assert out.pose_3d.shape == (batch, t_out, cfg.joints, 3)
    assert out.frame_indices.shape == (batch, t_out)
    stages = cfg.stages
    assert len(out.kept_indices) == len(stages)
    previous = None
    for (_, n), kept in zip(stages, out.kept_indices):
        assert kept.shape == (batch, n)
        for row in kept:
            assert torch.all(row[1:] > row[:-1]), "kept indices sorted and unique"
            assert 0 <= int(row.min()) and int(row.max()) < cfg.frames
        if previous is not None:  # later stages select among the frames already kept (original positions)
            for row, prev_row in zip(kept, previous):
                assert set(row.tolist()) <= set(prev_row.tolist())
        previous = kept


def forward_backward(cfg: ModelConfig, batch: int = 2) -> None:
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randn(batch, cfg.frames, cfg.joints, cfg.in_channels)
    out = model(x)
    check_output(out, cfg, batch)
    out.pose_3d.square().mean().backward()
    grads = [p.grad for name, p in model.named_parameters() if "embed" in name and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "gradients reach the embedding"


@pytest.mark.parametrize("backbone", sorted(MODEL_REGISTRY))
def test_full_model_forward_backward(backbone: str) -> None:
    forward_backward(tiny_cfg(backbone))


@pytest.mark.parametrize("backbone", PRUNABLE)
@pytest.mark.parametrize("tpm", sorted(TPM_REGISTRY))
@pytest.mark.parametrize("trm", sorted(TRM_REGISTRY))
def test_hierarchical_model_every_strategy(backbone: str, tpm: str, trm: str) -> None:
    forward_backward(tiny_cfg(backbone, schedule=[[1, 13], [2, 5]], tpm=tpm, trm=trm))


@pytest.mark.parametrize("backbone", PRUNABLE)
def test_one_stage_hot_schedule(backbone: str) -> None:
    forward_backward(tiny_cfg(backbone, schedule=[[1, 9]]))


def test_predict_with_flip_is_deterministic_in_eval() -> None:
    model = build_model(tiny_cfg("mixste", schedule=[[1, 9]])).eval()
    x = torch.randn(1, 27, 17, 2)
    with torch.no_grad():
        a, b = predict(model, x).pose_3d, predict(model, x).pose_3d
    assert torch.equal(a, b)


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = build_model(tiny_cfg("mixste"))
    with pytest.raises(ValueError, match=r"expected input \[B, 27, 17, 2\]"):
        model(torch.randn(1, 30, 17, 2))


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([[2, 9], [1, 5]], "blocks must strictly increase"),
        ([[1, 9], [2, 9]], "tokens must strictly decrease"),
        ([[5, 9]], "out of range"),
        ([[1, 40]], "exceed the 27 frames"),
        ([[1, 0]], "tokens must be >= 1"),
        ([[1]], "a stage is"),
    ],
)
def test_bad_schedules_raise_naming_the_field(schedule, message) -> None:
    with pytest.raises(ValueError, match=message) as err:
        build_model(tiny_cfg("mixste", schedule=schedule))
    assert "model.schedule[" in str(err.value)


def test_unknown_strategy_names_the_key() -> None:
    with pytest.raises(ValueError, match="model.tpm"):
        build_model(tiny_cfg("mixste", schedule=[[1, 9]], tpm="nope"))
    with pytest.raises(ValueError, match="model.trm"):
        build_model(tiny_cfg("mixste", schedule=[[1, 9]], trm="nope"))
    with pytest.raises(ValueError, match="model.backbone"):
        build_model(tiny_cfg("nope"))


@pytest.mark.parametrize("backbone", sorted(MODEL_REGISTRY))
def test_center_2d_makes_the_output_independent_of_where_the_person_stands(backbone: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 27, 17, 3 if backbone == "dstformer" else 2)
    shift = torch.zeros_like(x)
    shift[..., 0], shift[..., 1] = 0.3, -0.2  # the whole person moved on screen; confidences unchanged
    for center, same in ((True, True), (False, False)):
        model = build_model(tiny_cfg(backbone, center_2d=center)).eval()
        with torch.no_grad():
            moved = torch.allclose(model(x).pose_3d, model(x + shift).pose_3d, atol=1e-5)
        assert moved is same


# --------------------------------------------------------------------------------------------- one model per name
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMED = [name for name in MODEL_PRESETS if (CONFIGS / f"{name}.yaml").is_file() or
         (CONFIGS / f"h2ot_{name}.yaml").is_file()]


def test_the_small_presets_have_their_configs() -> None:
    assert {"mixste_small", "frameformer_small", "dstformer_small", "mixste", "dstformer"} <= set(NAMED)


@pytest.mark.parametrize("name", NAMED)
def test_a_preset_and_its_configs_describe_one_model(name: str) -> None:
    """configs/h2ot_<name>.yaml is the preset; configs/<name>.yaml is the preset without pruning."""
    preset = config_from_dict({"kind": "model", "model": {"preset": name}}).model
    expected = {"h2ot": to_dict(preset), "full": to_dict(preset) | {"schedule": []}}
    for variant, path in (("h2ot", CONFIGS / f"h2ot_{name}.yaml"), ("full", CONFIGS / f"{name}.yaml")):
        assert path.is_file(), f"preset {name!r} ships both configs: {path.name} is missing"
        model = to_dict(load_train_config(path).model)
        differ = {k: (model[k], expected[variant][k]) for k in model if model[k] != expected[variant][k]}
        assert not differ, f"{path.name} and preset {name!r} differ (config, preset): {differ}"
