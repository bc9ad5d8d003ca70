"""FLOPs conventions, their analytic prediction, and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch

from h2ot.checkpoint import load_checkpoint, save_checkpoint
from h2ot.config import MODEL_PRESETS, ModelConfig, config_from_dict
from h2ot.flops import model_gflops
from h2ot.models import build_model


def preset(name: str, **kw) -> ModelConfig:
    return config_from_dict({"kind": "model", "model": {"preset": name, **kw}}).model


def test_paper_size_mixste_matches_the_papers_linear_count() -> None:
    # The HoT paper counts Linear layers only: MixSTE 277.2 GFLOPs, HoT-MixSTE 167.5 (243 frames).
    full = model_gflops(build_model(preset("mixste", schedule=[])), preset("mixste", schedule=[]))
    hot_cfg = preset("mixste", schedule=[[3, 81]])
    hot = model_gflops(build_model(hot_cfg), hot_cfg)
    assert full["gflops_linear"] == pytest.approx(277.2, abs=0.1)
    assert hot["gflops_linear"] == pytest.approx(167.5, abs=0.1)
    assert hot["gflops_linear"] / full["gflops_linear"] == pytest.approx(0.60, abs=0.02)
    assert full["gflops_total"] == pytest.approx(295, abs=1.0)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_schedule_is_cheaper_and_matches_its_prediction(name: str) -> None:
    base = MODEL_PRESETS[name]
    if name in ("mixste", "dstformer"):
        pytest.skip("paper size is covered above (slow to count on CPU)")
    full_cfg = preset(name, schedule=[])
    full = model_gflops(build_model(full_cfg), full_cfg)
    for schedule in (base["schedule"], [[1, base["frames"] // 3]]):
        cfg = preset(name, schedule=schedule)
        g = model_gflops(build_model(cfg), cfg)
        assert g["gflops_total"] < full["gflops_total"] and g["gflops_linear"] < full["gflops_linear"]
        assert g["gflops_linear"] == pytest.approx(g["gflops_predicted_linear"], rel=0.05)
        assert g["gflops_total"] == pytest.approx(g["gflops_predicted_total"], rel=0.05)


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path) -> None:
    cfg = preset("mixste_tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, {"manifest_hash": "abc", "git_revision": "123"})
    loaded, payload = load_checkpoint(path)
    assert payload["meta"]["manifest_hash"] == "abc"
    assert payload["model_config"]["schedule"] == cfg.schedule
    x = torch.randn(2, cfg.frames, 17, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pose_3d, model(x).pose_3d)


def test_checkpoint_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable h2ot checkpoint"):
        load_checkpoint(bad)
