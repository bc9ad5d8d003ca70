"""The attention, motion and random TPMs and the nearest TRM, each on inputs whose answer is known."""

from __future__ import annotations

import torch
from model_helpers import PRUNABLE, cfg_of

from h2ot.config import ModelConfig
from h2ot.layers import ATTENTION_RECEIVED, Attention
from h2ot.models import build_model
from h2ot.pruning import TPM_REGISTRY
from h2ot.recovery import TRM_REGISTRY


def test_attention_pruner_picks_the_frames_a_constructed_attention_map_favours() -> None:
    # One head whose queries are a constant vector along channel 0 and whose keys are the tokens themselves:
    # every query attends most to the frames with a large channel 0, so those frames receive the most attention.
    b, t, j, c = 2, 12, 3, 4
    favoured = [[1, 5, 8, 10], [0, 2, 7, 11]]
    x = torch.zeros(b, t, j, c)
    for i, frames in enumerate(favoured):
        x[i, frames, :, 0] = 1.0
    attn = Attention(c, heads=1)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.qkv.bias[0] = 20.0  # q = 20 e_0
        attn.qkv.weight[c : 2 * c] = torch.eye(c)  # k = token
        attn.qkv.weight[2 * c :] = torch.eye(c)  # v = token
    sink: dict = {}
    tokens = x.permute(0, 2, 1, 3).reshape(b * j, t, c)  # temporal sequences, one per joint
    out = attn(tokens, sink)
    torch.testing.assert_close(out, attn(tokens), rtol=1e-5, atol=1e-6)  # same output as the SDPA path
    assert sink[ATTENTION_RECEIVED].shape == (b * j, t)
    torch.testing.assert_close(sink[ATTENTION_RECEIVED].sum(dim=1), torch.full((b * j,), float(t)))
    pruner = TPM_REGISTRY["attention"](ModelConfig(frames=t))
    _, kept = pruner(x, 4, torch.arange(t).expand(b, t), context=sink)
    assert kept.tolist() == favoured


def test_attention_tpm_is_fed_by_the_block_before_the_stage() -> None:
    for backbone in PRUNABLE:
        model = build_model(cfg_of(backbone, tpm="attention")).eval()
        state = model.hourglass.start(torch.zeros(1, 27, 17, 16))
        sinks = [model.hourglass.attention_sink(i, state) is not None for i in range(3)]
        assert sinks == [True, True, False], backbone  # stages before blocks 1 and 2
        model_dpc = build_model(cfg_of(backbone)).eval()
        assert model_dpc.hourglass.attention_sink(0, state) is None, "no recording for other strategies"


def test_motion_pruner_keeps_the_frames_that_move() -> None:
    t = 10
    feat = torch.zeros(1, t, 2, 3)
    feat[0, 4:, :, 0] = 1.0  # a jump into frame 4
    feat[0, 7:, :, 1] = 3.0  # a bigger jump into frame 7
    _, kept = TPM_REGISTRY["motion"](ModelConfig(frames=t))(feat, 2, torch.arange(t)[None])
    assert kept.tolist() == [[4, 7]]


def test_random_pruner_is_seeded_and_deterministic_in_eval() -> None:
    x = torch.randn(2, 30, 17, 4)
    idx = torch.arange(30).expand(2, 30)
    a = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=1)).eval()
    b = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=1)).eval()
    other = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=2)).eval()
    kept_a, kept_b, kept_other = a(x, 8, idx)[1], b(x, 8, idx)[1], other(x, 8, idx)[1]
    assert torch.equal(kept_a, a(x, 8, idx)[1]) and torch.equal(kept_a, kept_b)
    assert not torch.equal(kept_a, kept_other)
    train = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=1)).train()
    draws = {tuple(train(x, 8, idx)[1].flatten().tolist()) for _ in range(3)}
    assert len(draws) > 1, "training draws a fresh selection each step"


def test_nearest_trm_reproduces_a_piecewise_constant_sequence() -> None:
    bounds, kept = [(0, 5), (5, 11), (11, 18)], [2, 7, 14]  # midpoints 4.5 and 10.5 fall on the boundaries
    j, c = 3, 4
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(1, 1, j, c, generator=g) for _ in bounds]
    full = torch.cat([v.expand(1, hi - lo, j, c) for v, (lo, hi) in zip(values, bounds)], dim=1)
    trm = TRM_REGISTRY["nearest"](ModelConfig(frames=18), c)
    out = trm(full[:, kept], torch.tensor([kept]), 18)
    assert torch.equal(out, full)
    # ties go to the earlier kept frame; beyond the ends the first / last kept frame is held
    x_kept = torch.tensor([[1.0, 2.0]]).reshape(1, 2, 1, 1)
    out = trm(x_kept, torch.tensor([[2, 6]]), 9).flatten().tolist()
    assert out == [1, 1, 1, 1, 1, 2, 2, 2, 2]
