"""seq2frame: the TPMs keep the centre frame, the model returns it alone in eval, the loss targets follow
`frame_indices`."""

from __future__ import annotations

import pytest
import torch
from model_helpers import PRUNABLE, cfg_of

from h2ot.models import PoseOutput, build_model, predict
from h2ot.pruning import TPM_REGISTRY
from h2ot.schedule import validate_schedule
from h2ot.targets import select_targets


@pytest.mark.parametrize("backbone", PRUNABLE)
@pytest.mark.parametrize("tpm", sorted(TPM_REGISTRY))
def test_seq2frame_keeps_the_centre_with_every_tpm(backbone: str, tpm: str) -> None:
    cfg = cfg_of(backbone, seq2frame=True, tpm=tpm, schedule=[[1, 4], [2, 2]])  # uniform's 4 picks skip frame 13
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randn(2, cfg.frames, cfg.joints, cfg.in_channels)
    centre = cfg.frames // 2

    out = model(x)  # training mode: the kept frames, the targets of the loss
    assert out.pose_3d.shape == (2, 2, cfg.joints, 3)
    assert torch.equal(out.frame_indices, out.kept_indices[-1])
    out.pose_3d.square().mean().backward()
    assert model.embed.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(x)  # eval mode: the centre frame only
    assert out.pose_3d.shape == (2, 1, cfg.joints, 3)
    assert out.frame_indices.tolist() == [[centre], [centre]]
    for kept in out.kept_indices:
        assert all(centre in row for row in kept.tolist()), f"{tpm} dropped the centre frame"
    assert model.hourglass.recovery is None, "seq2frame has no TRM"


def test_seq2frame_rejects_a_window_without_a_centre_frame() -> None:
    with pytest.raises(ValueError, match="model.frames"):
        validate_schedule([[1, 5]], depth=3, frames=26, seq2frame=True)
    with pytest.raises(ValueError, match=r"model.schedule\[0\]"):
        build_model(cfg_of("mixste", seq2frame=True, schedule=[[1, 0]]))
    validate_schedule([[1, 1]], depth=3, frames=27, seq2frame=True)  # one token: the centre itself


def test_select_targets_follows_frame_indices() -> None:
    pose = torch.arange(2 * 7 * 1 * 3, dtype=torch.float32).reshape(2, 7, 1, 3)
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7]).bool()
    kept = torch.tensor([[0, 3, 5], [1, 3, 6]])
    target, v = select_targets(PoseOutput(torch.zeros(2, 3, 1, 3), [kept], kept), pose, valid)
    assert torch.equal(target, torch.stack([pose[0, [0, 3, 5]], pose[1, [1, 3, 6]]]))
    assert v.tolist() == [[True, True, False], [True, True, True]]
    centre = torch.full((2, 1), 3)
    target, v = select_targets(PoseOutput(torch.zeros(2, 1, 1, 3), [], centre), pose)
    assert torch.equal(target, pose[:, 3:4]) and v.all()


def test_predict_with_flip_on_a_seq2frame_model_in_eval_gives_the_centre() -> None:
    model = build_model(cfg_of("dstformer", seq2frame=True)).eval()
    with torch.no_grad():
        out = predict(model, torch.randn(1, 27, 17, 3))
    assert out.pose_3d.shape == (1, 1, 17, 3) and out.frame_indices.tolist() == [[13]]
