"""TPM and TRM behaviour on constructed sequences."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import PRUNABLE, cfg_of

from h2ot.config import ModelConfig, config_from_dict
from h2ot.models import build_model
from h2ot.pruning import TPM_REGISTRY, pairwise_sq_distances, top_n_by_rank, top_n_in_time_order
from h2ot.recovery import TRM_REGISTRY, TokenRecovery, _neighbours


def segments_sequence(lengths: list[int], j: int = 4, c: int = 8, seed: int = 0) -> torch.Tensor:
    """[1, T, J, C]: a few static segments, each a constant random token set."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(1, 1, j, c, generator=g).expand(1, n, j, c) for n in lengths]
    return torch.cat(parts, dim=1).contiguous()


def test_dpc_knn_picks_one_frame_per_static_segment_deterministically() -> None:
    lengths = [5, 7, 4, 6]
    x = segments_sequence(lengths)
    t = x.shape[1]
    pruner = TPM_REGISTRY["dpc_knn"](ModelConfig(frames=t, tpm_k=2))
    idx = torch.arange(t)[None]
    _, kept = pruner(x, len(lengths), idx)
    bounds = torch.tensor([0] + lengths).cumsum(0)
    segment_of = torch.bucketize(kept[0], bounds[1:], right=True)
    assert sorted(segment_of.tolist()) == list(range(len(lengths)))
    _, again = pruner(x, len(lengths), idx)
    assert torch.equal(kept, again)


def test_pruners_keep_sorted_original_positions() -> None:
    x = torch.randn(2, 20, 17, 8)
    original = torch.arange(100, 120)[None].expand(2, 20)  # tokens that stand for frames 100..119
    for name, cls in TPM_REGISTRY.items():
        tokens, kept = cls(ModelConfig(frames=20))(x, 6, original)
        assert tokens.shape == (2, 6, 17, 8), name
        assert torch.all(kept[:, 1:] > kept[:, :-1]), name
        assert kept.min() >= 100 and kept.max() < 120, name
        local = kept - 100
        assert torch.equal(tokens, torch.gather(x, 1, local[:, :, None, None].expand(2, 6, 17, 8))), name


def test_uniform_spreads_over_the_sequence() -> None:
    x = torch.randn(1, 9, 17, 4)
    _, kept = TPM_REGISTRY["uniform"](ModelConfig(frames=9))(x, 3, torch.arange(9)[None])
    assert kept[0].tolist() == [0, 4, 8]


def test_uniform_keeps_the_top_n_of_its_scores_without_computing_them() -> None:
    """Its constant positions are exactly what the scores' top-n selects, for every count and batch size."""
    pruner = TPM_REGISTRY["uniform"](ModelConfig(frames=243))
    for t in (1, 2, 5, 9, 13, 27, 81, 243):
        for n in sorted({1, min(2, t), max(1, t // 3), t // 2 or 1, t - 1 or 1, t}):
            for b in (1, 3):
                x = torch.randn(b, t, 2, 4)
                local = pruner._select(x, n, None, None)
                assert torch.equal(local, top_n_in_time_order(pruner.scores(x, n, {}), n)), (t, n, b)
                assert local.unique(dim=1).shape[1] == n


def test_must_keep_is_always_kept() -> None:
    x = torch.randn(1, 27, 17, 8)
    idx = torch.arange(27)[None]
    for name, cls in TPM_REGISTRY.items():
        _, kept = cls(ModelConfig(frames=27))(x, 4, idx, must_keep=idx == 13)
        assert 13 in kept[0].tolist(), name


def test_linear_trm_reproduces_linear_motion_between_kept_frames() -> None:
    t, j, c = 30, 3, 5
    slope, offset = torch.randn(1, 1, j, c), torch.randn(1, 1, j, c)
    full = offset + slope * torch.arange(t, dtype=torch.float32)[None, :, None, None]
    kept_idx = torch.tensor([[4, 9, 17, 25]])
    x_kept = full[:, kept_idx[0]]
    out = TRM_REGISTRY["linear"](ModelConfig(frames=t), c)(x_kept, kept_idx, t)
    assert out.shape == full.shape
    torch.testing.assert_close(out[:, 4:26], full[:, 4:26], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :4], full[:, 4:5].expand(1, 4, j, c))  # held before the first kept
    torch.testing.assert_close(out[:, 26:], full[:, 25:26].expand(1, 4, j, c))  # and after the last


def test_nearest_trm_copies_the_nearest_kept_frame_earlier_on_ties() -> None:
    kept_idx = torch.tensor([[1, 4, 8]])
    x_kept = torch.tensor([10.0, 40.0, 80.0])[None, :, None, None]  # [1, 3, 1, 1]: value = 10 x its frame
    out = TRM_REGISTRY["nearest"](ModelConfig(frames=10), 1)(x_kept, kept_idx, 10)
    # frame:               0   1   2   3   4   5   6   7   8   9  (6: tie between 4 and 8 -> 4)
    expected = torch.tensor([10, 10, 10, 40, 40, 40, 40, 80, 80, 80], dtype=torch.float32)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_cross_attention_trm_restores_length() -> None:
    cfg = ModelConfig(frames=27, dim=16, heads=2)
    trm = TRM_REGISTRY["cross_attention"](cfg, 16)
    out = trm(torch.randn(2, 9, 17, 16), torch.arange(0, 27, 3)[None].expand(2, 9), 27)
    assert out.shape == (2, 27, 17, 16)
    assert torch.all(trm.queries == 0), "queries are zero-initialised"


# ---- exportable rewrites: the same results as the ops they replace (stable argsort, cdist, searchsorted) ----

def _stable_top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The selection before the rewrite: stable descending argsort, first n, re-sorted in time."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :n].sort(dim=1).values


@pytest.mark.parametrize("seed", range(6))
def test_top_n_in_time_order_matches_a_stable_sort_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = [5, 27, 81, 243, 13, 40][seed]
    tied = torch.randint(0, 4, (3, t), generator=g).float()  # many equal scores
    distinct = torch.randn(3, t, generator=g)
    with_inf = tied.masked_fill(torch.arange(t) == t // 2, math.inf)
    for scores in (tied, distinct, with_inf):
        for n in (1, max(1, t // 3), t):
            assert torch.equal(top_n_in_time_order(scores, n), _stable_top_n(scores, n)), (t, n)
            assert torch.equal(top_n_by_rank(scores, n), _stable_top_n(scores, n)), (t, n)  # the traced form


@pytest.mark.parametrize(("t", "c"), [(3, 32), (27, 64), (81, 64), (27, 2048), (243, 32), (243, 512)])
def test_pairwise_sq_distances_are_exact_symmetric_and_accurate(t: int, c: int) -> None:
    """On features with a large shared part, as a trained model's frames have: float64's own accuracy, exactly
    symmetric, zero on the diagonal (each clip of the batch its own). torch.cdist's product formula is neither
    symmetric nor zero there (it leaves the square root of |a|^2 - |a|^2's rounding), and in fp32 it is off by
    5e-4 to 1e-3 of the distance on these features."""
    g = torch.Generator().manual_seed(t + c)
    feat = torch.randn(2, t, c, generator=g) * 0.05 + torch.randn(1, 1, c, generator=g) * 3
    dist = pairwise_sq_distances(feat)
    assert dist.dtype == torch.float64
    truth = torch.cdist(feat.double(), feat.double()).masked_fill(torch.eye(t, dtype=torch.bool), 0).pow(2)
    torch.testing.assert_close(dist, truth, rtol=1e-9, atol=1e-12)
    assert torch.equal(dist, dist.transpose(1, 2))
    assert torch.all(dist.diagonal(dim1=1, dim2=2) == 0)


def test_dpc_knn_keeps_the_same_frames_when_the_input_moves_by_rounding() -> None:
    """k = 2: a frame and its nearest neighbour have the same density when each is the other's nearest
    neighbour, so which one is denser (and which frames are kept) must not depend on how distances round. An
    untrained frame-token model (nearly equal frame features) kept other frames on 12 of these 32 windows under a
    1e-7 relative change of its input while the product formula's distances were not symmetric."""
    cfg = config_from_dict({"kind": "model", "model": dict(
        backbone="frameformer", frames=27, dim=32, depth=3, heads=4, schedule=[[1, 13], [2, 5]], tpm="dpc_knn",
        trm="nearest")}).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(32, cfg.frames, cfg.joints, cfg.in_channels, generator=torch.Generator().manual_seed(5)) * 0.3
    with torch.no_grad():
        kept, moved = model(x).kept_indices, model(x * (1 + 1e-7)).kept_indices
    for a, b in zip(kept, moved):
        assert torch.equal(a, b)


def test_neighbours_match_searchsorted() -> None:
    g = torch.Generator().manual_seed(0)
    for frames, n in ((27, 5), (81, 27), (243, 1), (9, 9)):
        kept = torch.stack([torch.randperm(frames, generator=g)[:n].sort().values for _ in range(3)])
        t, left, right = _neighbours(kept, frames)
        expected_right = torch.searchsorted(kept, t.contiguous()).clamp(max=n - 1)
        assert torch.equal(right, expected_right)
        assert torch.equal(left, (expected_right - 1).clamp(min=0))


def test_scoring_runs_in_fp32_without_autograd_inside_autocast() -> None:
    x = torch.randn(2, 27, 17, 16, requires_grad=True)
    idx = torch.arange(27)[None].expand(2, 27)
    seen = {}
    pruner = TPM_REGISTRY["dpc_knn"](ModelConfig(frames=27))
    scores = pruner.scores

    def spy(tokens: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        seen.update(dtype=tokens.dtype, grad=torch.is_grad_enabled(), autocast=torch.is_autocast_enabled("cpu"))
        return scores(tokens, n, context)

    pruner.scores = spy
    _, kept_fp32 = pruner(x, 9, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, kept_bf16 = pruner(x.bfloat16(), 9, idx)
    assert seen == {"dtype": torch.float32, "grad": False, "autocast": False}
    assert tokens.requires_grad, "the gathered tokens still carry gradients to the blocks"
    assert kept_bf16.shape == kept_fp32.shape


def test_every_trm_subclasses_the_base_and_states_its_costs() -> None:
    cfg = ModelConfig(frames=27, dim=16, heads=2)
    for name, cls in TRM_REGISTRY.items():
        assert issubclass(cls, TokenRecovery), name
        assert cls.linear_macs(cfg, 27, 9) >= 0 and cls.attention_macs(cfg, 27, 9) >= 0, name
    assert TRM_REGISTRY["cross_attention"].linear_macs(cfg, 27, 9) == (27 + 2 * 9 + 27) * 16 * 16
    assert TRM_REGISTRY["linear"].linear_macs(cfg, 27, 9) == 0


@pytest.mark.parametrize("backbone", PRUNABLE)
@pytest.mark.parametrize("trm", sorted(TRM_REGISTRY))
def test_fixed_position_pruning_computes_what_the_general_path_computes(backbone: str, trm: str) -> None:
    """With the uniform TPM the kept frames and the TRM's weights are constants of the schedule (one index_select a
    stage, one product for the linear TRM): the same poses, kept frames and gradients as pruning and recovering
    from the kept indices of each clip."""
    torch.manual_seed(0)
    fixed = build_model(cfg_of(backbone, tpm="uniform", trm=trm, schedule=[[1, 13], [2, 5]]))
    general = build_model(cfg_of(backbone, tpm="uniform", trm=trm, schedule=[[1, 13], [2, 5]]))
    general.load_state_dict(fixed.state_dict())
    assert fixed.hourglass.fixed_stages is not None
    general.hourglass.fixed_stages = None
    x = torch.randn(3, 27, 17, fixed.cfg.in_channels)
    for mode in ("eval", "train"):
        outs = []
        for model in (fixed, general):
            getattr(model, mode)()
            model.zero_grad()
            out = model(x)
            out.pose_3d.square().mean().backward()
            outs.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (a, grads_a), (b, grads_b) = outs
        torch.testing.assert_close(a.pose_3d, b.pose_3d, rtol=0, atol=1e-6)
        assert [k.tolist() for k in a.kept_indices] == [k.tolist() for k in b.kept_indices]
        assert torch.equal(a.frame_indices, b.frame_indices)
        assert len(grads_a) == len(grads_b)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_only_the_uniform_tpm_of_a_seq2seq_model_prunes_by_fixed_positions() -> None:
    # 13 of 25 frames keeps every second one; 5 of those 13, every third of them: every sixth frame
    assert build_model(cfg_of("frameformer", frames=25, tpm="uniform")).hourglass.fixed_stages == [
        (tuple(range(0, 25, 2)), tuple(range(0, 25, 2))),
        ((0, 3, 6, 9, 12), (0, 6, 12, 18, 24)),
    ]
    for name in TPM_REGISTRY:
        if name != "uniform":
            assert build_model(cfg_of("frameformer", tpm=name)).hourglass.fixed_stages is None, name
    seq2frame = cfg_of("frameformer", tpm="uniform", seq2frame=True, schedule=[[1, 13], [2, 5]])
    assert build_model(seq2frame).hourglass.fixed_stages is None  # the centre frame must be kept
