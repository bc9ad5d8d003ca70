"""MPI-INF-3DHP metrics: PCK@150 mm and AUC against hand-computed values, masks and per-action means."""

from __future__ import annotations

import pytest
import torch

from h2ot.metrics import AUC_THRESHOLDS_MM, PCKAccumulator, auc_3dhp, pck_3dhp, per_action_mean


def test_pck_and_auc_against_hand_computed_values() -> None:
    errors_mm = torch.tensor([0.0, 3.0, 7.0, 100.0, 149.9, 150.0, 200.0])
    pred = torch.zeros(1, 1, 7, 3)
    target = torch.zeros(1, 1, 7, 3)
    target[0, 0, :, 0] = errors_mm / 1000.0  # metres
    # PCK@150: 0, 3, 7, 100 and 149.9 are strictly below 150 -> 5 of 7
    assert float(pck_3dhp(pred, target)) == pytest.approx(500 / 7)
    # AUC: mean over t = 0, 5, ..., 150 of #(e < t) / 7. t = 0: 0; t = 5: 2; t = 10..100: 3 (19 values);
    # t = 105..145: 4 (9 values); t = 150: 5  ->  (0 + 2 + 19*3 + 9*4 + 5) / 31 / 7
    assert len(AUC_THRESHOLDS_MM) == 31
    assert float(auc_3dhp(pred, target)) == pytest.approx((2 + 57 + 36 + 5) / 31 / 7 * 100)
    assert float(pck_3dhp(pred, target, joints=[0, 6])) == pytest.approx(50.0)


def test_pck_honours_the_mask_and_aggregates_per_action() -> None:
    pred = torch.zeros(2, 2, 1, 3)
    target = torch.zeros(2, 2, 1, 3)
    target[0, 1, 0, 0] = 0.2  # 200 mm, in a padded frame
    target[1, :, 0, 0] = 0.2  # 200 mm in both frames of clip 1
    valid = torch.tensor([[True, False], [True, True]])
    assert float(pck_3dhp(pred, target, valid)) == pytest.approx(100 / 3)
    acc = PCKAccumulator()
    acc.update(pred, target, valid, ["TS1", "TS2"])
    res = acc.result()
    assert res["pck"] == pytest.approx(100 / 3) and res["joints"] == 3
    assert res["per_action"]["TS1"]["pck"] == 100.0 and res["per_action"]["TS2"]["pck"] == 0.0
    assert res["per_action"]["TS1"]["auc"] == pytest.approx(30 / 31 * 100)  # every threshold but 0
    assert per_action_mean([1.0, 3.0, 5.0], ["a", "b", "a"], [1.0, 1.0, 3.0]) == {"a": 4.0, "b": 3.0}
