"""Small model configs shared by the backbone and strategy tests."""

from __future__ import annotations

from h2ot.config import ModelConfig, config_from_dict
from h2ot.models import MODEL_REGISTRY

PRUNABLE = sorted(name for name in MODEL_REGISTRY if name != "mlp")  # the per-frame MLP has no frame tokens


def cfg_of(backbone: str, **kw) -> ModelConfig:
    base = dict(backbone=backbone, frames=27, dim=16, depth=3, heads=2, mlp_ratio=2.0, schedule=[[1, 13], [2, 5]])
    if backbone == "dstformer":
        base.update(in_channels=3, rep_dim=24)
    base.update(kw)
    return ModelConfig(**base)


def preset(name: str, **kw) -> ModelConfig:
    return config_from_dict({"kind": "model", "model": {"preset": name, **kw}}).model
