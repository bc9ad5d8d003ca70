"""The frame-token transformer: frames mix, frame tokens are pruned, FLOPs are counted per frame token."""

from __future__ import annotations

import torch
from model_helpers import cfg_of, preset

from h2ot.flops import predicted_linear_flops
from h2ot.models import build_model


def test_frameformer_mixes_frames_and_prunes_frame_tokens() -> None:
    """One token a frame: an input change in frame 0 reaches every output frame (the per-frame MLP's stays in
    frame 0), the TPMs keep [B, n] frame indices, and the FLOPs predictions count frame tokens, not joints."""
    torch.manual_seed(0)
    x = torch.randn(1, 27, 17, 2)
    moved = x.clone()
    moved[0, 0] += 0.5
    for backbone, reaches_others in (("frameformer", True), ("mlp", False)):
        model = build_model(cfg_of(backbone, dim=32, heads=4, schedule=[])).eval()
        with torch.no_grad():
            change = (model(moved).pose_3d - model(x).pose_3d).abs().amax(dim=(0, 2, 3))
        assert change[0] > 0
        assert bool((change[1:] > 1e-6).all()) is reaches_others, backbone
    cfg = preset("frameformer_small")  # [[1, 13], [2, 9]], linear TRM (no parameters, no Linear FLOPs)
    out = build_model(cfg)(torch.randn(2, 27, 17, 2))
    assert out.pose_3d.shape == (2, 27, 17, 3) and [k.shape for k in out.kept_indices] == [(2, 13), (2, 9)]
    block = 4 * 256 * 256 + 2 * 256 * 512
    by_hand = 27 * 34 * 256 + (27 + 13 + 9) * block + 27 * 256 * 51
    assert predicted_linear_flops(cfg) == 2 * by_hand
    cross = preset("frameformer_small", trm="cross_attention")  # + T queries, n keys and values, T outputs: C^2
    assert predicted_linear_flops(cross) == 2 * (by_hand + (27 + 2 * 9 + 27) * 256 * 256)
