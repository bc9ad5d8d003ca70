"""DSTformer: forward and backward with every TPM and TRM, its stream fusion at init, its FLOPs against the
prediction and against MotionBERT's published count."""

from __future__ import annotations

import functools

import pytest
import torch
from model_helpers import cfg_of, preset

from h2ot.flops import model_gflops, predicted_linear_flops
from h2ot.models import PoseOutput, build_model
from h2ot.pruning import TPM_REGISTRY
from h2ot.recovery import TRM_REGISTRY


@pytest.mark.parametrize("tpm", sorted(TPM_REGISTRY))
@pytest.mark.parametrize("trm", sorted(TRM_REGISTRY))
def test_dstformer_forward_backward_every_strategy(tpm: str, trm: str) -> None:
    cfg = cfg_of("dstformer", depth=2, schedule=[[1, 9]], tpm=tpm, trm=trm)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(torch.randn(2, 27, 17, 3))
    assert isinstance(out, PoseOutput) and out.pose_3d.shape == (2, 27, 17, 3)
    assert out.kept_indices[0].shape == (2, 9)
    out.pose_3d.square().mean().backward()
    assert model.embed.weight.grad.abs().sum() > 0


def test_dstformer_fuses_the_two_streams_equally_at_init() -> None:
    model = build_model(cfg_of("dstformer", schedule=[]))
    for block in model.blocks:
        assert torch.all(block.fuse.weight == 0) and torch.all(block.fuse.bias == 0.5)
    assert model.embed.in_features == 3, "x, y, confidence"


def test_paper_size_dstformer_prediction_matches_motionbert_figures() -> None:
    # HoT paper: MotionBERT 131.1 GFLOPs, HoT + MotionBERT 63.2 (Linear layers, 243 frames). The measured count
    # equals the prediction (checked on small sizes below; paper size is slow on CPU: see `h2ot bench`).
    full = predicted_linear_flops(preset("dstformer", schedule=[])) / 1e9
    hot = predicted_linear_flops(preset("dstformer", schedule=[[1, 81]])) / 1e9
    h2ot = predicted_linear_flops(preset("dstformer")) / 1e9
    assert full == pytest.approx(131.1, abs=0.1)
    assert hot == pytest.approx(63.2, abs=0.1)
    assert h2ot < hot


@functools.cache
def small_full_dstformer_gflops() -> dict[str, float]:
    cfg = cfg_of("dstformer", frames=45, schedule=[])
    return model_gflops(build_model(cfg), cfg)


@pytest.mark.parametrize(
    "schedule, tpm, seq2frame",
    [
        ([[1, 15]], "dpc_knn", False),
        ([[1, 15], [2, 5]], "attention", False),  # column sums of both streams' recorded attention
        ([[0, 15], [2, 5]], "attention", False),  # block 0: the parameter-free fallback (a counted matmul)
        ([[1, 15], [2, 5]], "motion", True),  # seq2frame in eval: head and pre-logits on the centre frame
    ],
)
def test_dstformer_flops_match_the_prediction(schedule, tpm, seq2frame) -> None:
    cfg = cfg_of("dstformer", frames=45, schedule=schedule, tpm=tpm, seq2frame=seq2frame)
    g, full = model_gflops(build_model(cfg), cfg), small_full_dstformer_gflops()
    assert g["gflops_linear"] == pytest.approx(g["gflops_predicted_linear"], rel=0.05)
    assert g["gflops_total"] == pytest.approx(g["gflops_predicted_total"], rel=0.05)
    assert full["gflops_linear"] == pytest.approx(full["gflops_predicted_linear"], rel=1e-6)
    assert full["gflops_total"] == pytest.approx(full["gflops_predicted_total"], rel=1e-6)
    assert g["gflops_total"] < full["gflops_total"]
