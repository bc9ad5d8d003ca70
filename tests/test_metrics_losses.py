"""Metrics and losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from h2ot.losses import pose_loss, velocity_loss, weighted_mpjpe
from h2ot.metrics import MetricAccumulator, mpjpe_mm, mpjve_mm, p_mpjpe_mm
from h2ot.skeleton import FLIP_PERMUTATION, JOINT_LOSS_WEIGHTS, flip_pose


def random_pose(b: int = 2, t: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 17, 3, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_mpjpe_hand_computed() -> None:
    gt = torch.zeros(1, 2, 17, 3)
    pred = gt.clone()
    pred[0, 0, :, 0] = 0.010  # every joint 10 mm off in frame 0
    pred[0, 1, :, 1] = 0.030  # 30 mm in frame 1
    assert mpjpe_mm(pred, gt).item() == pytest.approx(20.0)
    valid = torch.tensor([[1, 0]])
    assert mpjpe_mm(pred, gt, valid).item() == pytest.approx(10.0)  # the padded frame is ignored


def test_p_mpjpe_is_invariant_to_similarity_transforms_incl_reflection() -> None:
    gt = random_pose()
    angle = 0.7
    rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1.0]])
    transformed = 1.7 * gt @ rot.T + torch.tensor([0.3, -0.2, 1.0])
    assert p_mpjpe_mm(transformed, gt).item() == pytest.approx(0.0, abs=1e-3)
    noisy = gt + 0.01 * random_pose(seed=1)
    base = p_mpjpe_mm(noisy, gt).item()
    assert 0 < base < mpjpe_mm(noisy, gt).item() + 1e-6
    assert p_mpjpe_mm(1.3 * noisy @ rot.T + 0.5, gt).item() == pytest.approx(base, rel=1e-3)
    # A reflection is not a rotation: a mirrored pose is not aligned away.
    mirrored = gt * torch.tensor([-1.0, 1.0, 1.0])
    assert p_mpjpe_mm(mirrored, gt).item() > 1.0


def test_mpjve_hand_computed_and_masked() -> None:
    gt = torch.zeros(1, 3, 17, 3)
    pred = gt.clone()
    pred[0, 1, :, 2] = 0.004  # frame 1 off by 4 mm: steps 0->1 and 1->2 each have 4 mm velocity error
    assert mpjve_mm(pred, gt).item() == pytest.approx(4.0)
    pred[0, 2, :, 2] = 0.100
    assert mpjve_mm(pred, gt, torch.tensor([[1, 1, 0]])).item() == pytest.approx(4.0)  # step 1->2 not counted


def test_accumulator_matches_functions_and_groups_actions() -> None:
    gt, pred = random_pose(), random_pose(seed=3)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    acc = MetricAccumulator()
    acc.update(pred, gt, valid, ["Walking", "Eating"])
    res = acc.result()
    assert res["frames"] == 8
    assert res["mpjpe_mm"] == pytest.approx(mpjpe_mm(pred, gt, valid).item(), rel=1e-5)
    assert res["p_mpjpe_mm"] == pytest.approx(p_mpjpe_mm(pred, gt, valid).item(), rel=1e-4)
    assert res["mpjve_mm"] == pytest.approx(mpjve_mm(pred, gt, valid).item(), rel=1e-5)
    assert res["per_action"]["Walking"]["frames"] == 3
    assert res["per_action"]["Eating"]["mpjpe_mm"] == pytest.approx(mpjpe_mm(pred[1:], gt[1:]).item(), rel=1e-5)


def test_weighted_loss_hand_computed() -> None:
    gt = torch.zeros(1, 2, 17, 3)
    pred = gt.clone()
    pred[..., 0] = 0.1
    expected = 0.1 * sum(JOINT_LOSS_WEIGHTS) / 17
    assert weighted_mpjpe(pred, gt, torch.ones(1, 2)).item() == pytest.approx(expected)
    assert velocity_loss(pred, gt, torch.ones(1, 2)).item() == pytest.approx(0.0)
    loss, parts = pose_loss(pred, gt, torch.ones(1, 2))
    assert loss.item() == pytest.approx(expected) and parts["tc"] == pytest.approx(0.0)


def test_flip_twice_is_identity_and_swaps_sides() -> None:
    pose = random_pose()
    torch.testing.assert_close(flip_pose(flip_pose(pose)), pose)
    flipped = flip_pose(pose)
    assert torch.allclose(flipped[..., 1, 0], -pose[..., 4, 0])  # r_hip <- -l_hip x
    assert sorted(FLIP_PERMUTATION) == list(range(17))
    np_pose = pose.numpy()
    assert (flip_pose(flip_pose(np_pose)) == np_pose).all()
