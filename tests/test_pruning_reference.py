"""The batch-1 fast paths of pruning and recovery against straightforward reference implementations.

h2ot.pruning and h2ot.recovery compute DPC-kNN, the top-n selection and the linear TRM in as few tensor ops as they
can (a small model's batch-1 forward pays microseconds per op). Here the same things are written the plain way,
one frame at a time, from their definitions; seeded models must keep the same frames and give the same poses
(within 1e-5) with either. Inputs include repeated frames (exact ties, as the start-up padding of a stream makes).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from h2ot.config import ModelConfig, config_from_dict
from h2ot.models import build_model
from h2ot.pruning import _LENGTH_CONSTANTS, TPM_REGISTRY, frame_positions, top_n_by_rank, top_n_in_time_order
from h2ot.recovery import TRM_REGISTRY, interpolation_weights

# ---- references, from the definitions ----


def reference_distances(feat: torch.Tensor) -> torch.Tensor:
    """[T, T] Euclidean distances of one clip's frame features [T, C]: each pair's differences summed, in float64."""
    t = feat.shape[0]
    feat = feat.double()
    return torch.stack([torch.stack([(feat[i] - feat[j]).pow(2).sum().sqrt() for j in range(t)])
                        for i in range(t)]).float()


def reference_dpc_knn_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """DPC-kNN scores [B, T] of tokens [B, T, J, C], one frame at a time: density_i = exp(-mean of the k smallest
    squared distances of frame i), delta_i = distance to the nearest denser frame (equal densities: the later frame
    counts as denser), the largest distance of the clip for the densest frame; score = density * delta."""
    b, t, _, c = x.shape
    scores = torch.empty(b, t)
    for bi in range(b):
        dist = reference_distances(x[bi].float().mean(dim=1)) / math.sqrt(c)
        density = [torch.exp(-dist[i].pow(2).sort().values[: min(k, t)].mean()) for i in range(t)]
        for i in range(t):
            denser = [j for j in range(t) if density[j] > density[i] or (density[j] == density[i] and j > i)]
            delta = min(dist[i, j] for j in denser) if denser else dist.max()
            scores[bi, i] = density[i] * delta
    return scores


def reference_top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n highest scores' positions, equal scores by position, listed in time order."""
    return torch.tensor([sorted(sorted(range(len(row)), key=lambda i: (-row[i], i))[:n]) for row in scores.tolist()])


def reference_linear_recovery(x_kept: torch.Tensor, kept: torch.Tensor, frames: int) -> torch.Tensor:
    """Each frame interpolated linearly between the kept frames around it; the first / last kept frame held."""
    out = []
    for bi, ks in enumerate(kept.tolist()):
        rows = []
        for t in range(frames):
            if t <= ks[0]:
                rows.append(x_kept[bi, 0])
            elif t >= ks[-1]:
                rows.append(x_kept[bi, -1])
            else:
                right = next(m for m, k in enumerate(ks) if k >= t)
                w = (t - ks[right - 1]) / (ks[right] - ks[right - 1])
                rows.append((1 - w) * x_kept[bi, right - 1] + w * x_kept[bi, right])
        out.append(torch.stack(rows))
    return torch.stack(out)


class ReferenceDpcKnn(nn.Module):
    """TokenPruner's interface over the references."""

    uses_attention = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.tpm_k

    def forward(self, x, n, frame_indices, must_keep=None, context=None):
        scores = reference_dpc_knn_scores(x.detach(), self.k)
        if must_keep is not None:
            scores = scores.masked_fill(must_keep, math.inf)
        local = reference_top_n(scores, n)
        kept = torch.stack([x[bi, local[bi]] for bi in range(x.shape[0])])
        if frame_indices is None:  # the tokens are the original frames in order
            frame_indices = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return kept, torch.stack([frame_indices[bi, local[bi]] for bi in range(x.shape[0])])


class ReferenceLinear(nn.Module):
    def forward(self, x_kept, kept_indices, frames):
        return reference_linear_recovery(x_kept, kept_indices, frames)


def clips(cfg: ModelConfig, seed: int) -> torch.Tensor:
    """4 clips: random, one frame repeated (every score tied), a start-up padding (the first half repeats frame 0),
    random again."""
    x = torch.randn(4, cfg.frames, cfg.joints, cfg.in_channels, generator=torch.Generator().manual_seed(seed)) * 0.3
    x[1] = x[1, :1]
    x[2, : cfg.frames // 2] = x[2, :1]
    return x


# ---- the pieces ----


@pytest.mark.parametrize(("t", "j", "c"), [(5, 4, 8), (13, 1, 256), (13, 17, 64), (27, 1, 256), (27, 17, 64),
                                           (81, 17, 32)])
def test_dpc_knn_scores_and_kept_frames_match_the_reference(t: int, j: int, c: int) -> None:
    g = torch.Generator().manual_seed(t * 100 + j)
    x = torch.randn(3, t, j, c, generator=g)
    x[1, 1::2] = x[1, 0 : t - 1 : 2]  # pairs of equal frames: ties in density and delta
    cfg = ModelConfig(frames=t, tpm_k=2)
    pruner = TPM_REGISTRY["dpc_knn"](cfg)
    with torch.no_grad():
        # the pruner ranks by 2 log(rho * delta) + log C, a strictly increasing function of the score
        as_rho_delta = ((pruner.scores(x, 3, {}) - math.log(c)) / 2).exp().float()
        torch.testing.assert_close(as_rho_delta, reference_dpc_knn_scores(x, 2), rtol=1e-6, atol=1e-7)
        for n in (1, max(1, t // 3), t):
            _, kept = pruner(x, n, torch.arange(t).expand(3, t))
            assert torch.equal(kept, reference_top_n(reference_dpc_knn_scores(x, 2), n)), (t, n)


@pytest.mark.parametrize("seed", range(4))
def test_both_selections_match_the_reference_with_ties(seed: int) -> None:
    """top_n_in_time_order (eager: a stable sort) and top_n_by_rank (what traced graphs and ONNX run)."""
    g = torch.Generator().manual_seed(seed)
    t = [5, 27, 81, 243][seed]
    tied = torch.randint(0, 4, (3, t), generator=g).float()
    for scores in (tied, torch.randn(3, t, generator=g), tied.masked_fill(torch.arange(t) == t // 2, math.inf),
                   torch.zeros(3, t)):
        for n in (1, max(1, t // 3), t):
            expected = reference_top_n(scores, n)
            assert torch.equal(top_n_in_time_order(scores, n), expected), (t, n)
            assert torch.equal(top_n_by_rank(scores, n), expected), (t, n)


def test_linear_recovery_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    trm = TRM_REGISTRY["linear"](ModelConfig(frames=27), 8)
    for frames, n, j in ((27, 9, 17), (27, 13, 1), (81, 27, 3), (27, 1, 2), (10, 10, 1)):
        kept = torch.stack([torch.randperm(frames, generator=g)[:n].sort().values for _ in range(3)])
        x_kept = torch.randn(3, n, j, 8, generator=g)
        out = trm(x_kept, kept, frames)
        torch.testing.assert_close(out, reference_linear_recovery(x_kept, kept, frames), rtol=0, atol=1e-6)
        weights = interpolation_weights(kept, frames)
        torch.testing.assert_close(weights.sum(dim=2), torch.ones(3, frames))  # a convex combination per frame
        assert torch.all(weights[torch.arange(3)[:, None], kept, torch.arange(n)] == 1)  # kept frames pass as they are


# ---- whole models: the same kept frames and poses as with the references swapped in ----


@pytest.mark.parametrize("model", [
    dict(preset="frameformer_small", tpm="dpc_knn"),
    dict(preset="mixste_small"),
    dict(preset="mixste_small", seq2frame=True),
    dict(preset="dstformer_small", trm="linear"),
    dict(preset="frameformer_small", tpm="dpc_knn", frames=81, schedule=[[1, 40], [2, 26]]),
])
def test_models_keep_the_same_frames_and_poses_as_the_reference(model: dict) -> None:
    cfg = config_from_dict({"kind": "model", "model": model}).model
    torch.manual_seed(0)
    fast = build_model(cfg).eval()
    reference = build_model(cfg).eval()
    reference.load_state_dict(fast.state_dict())
    reference.hourglass.pruner = ReferenceDpcKnn(cfg)
    if not cfg.seq2frame:
        reference.hourglass.recovery = ReferenceLinear()
    x = clips(cfg, seed=len(str(model)))
    with torch.inference_mode():
        for batch in (x, x[:1], x[1:2], x[2:3]):  # batch 1 takes other ops than a batch (index_select vs gather)
            got, expected = fast(batch), reference(batch)
            assert len(got.kept_indices) == len(cfg.stages)
            for k_got, k_expected in zip(got.kept_indices, expected.kept_indices):
                assert torch.equal(k_got, k_expected)
            torch.testing.assert_close(got.pose_3d, expected.pose_3d, rtol=0, atol=1e-5)
            assert torch.equal(got.frame_indices, expected.frame_indices)


def test_training_mode_gradients_reach_the_kept_tokens_as_with_the_reference() -> None:
    cfg = config_from_dict({"kind": "model", "model": {"preset": "mixste_small"}}).model
    torch.manual_seed(0)
    fast = build_model(cfg)
    reference = build_model(cfg)
    reference.load_state_dict(fast.state_dict())
    reference.hourglass.pruner = ReferenceDpcKnn(cfg)
    reference.hourglass.recovery = ReferenceLinear()
    x = clips(cfg, seed=3)[:2]
    for model in (fast, reference):
        model.train()
        torch.manual_seed(1)
        model(x).pose_3d.square().sum().backward()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters()):
        scale = p_ref.grad.abs().max().item()  # float rounding differs: compare against the gradient's size
        assert (p_fast.grad - p_ref.grad).abs().max().item() <= 1e-5 * max(scale, 1.0), name


def test_a_fake_tensor_mode_builds_length_constants_afresh_and_caches_no_fake_tensor() -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    real = frame_positions(23, torch.device("cpu"))
    with FakeTensorMode():
        fake = frame_positions(23, torch.device("cpu"))
        assert isinstance(fake, FakeTensor)
    assert all(type(v) is torch.Tensor for v in _LENGTH_CONSTANTS.values()), "a fake tensor was cached"
    assert frame_positions(23, torch.device("cpu")) is real


def test_tracing_builds_length_constants_afresh_and_caches_no_traced_tensor() -> None:
    cfg = ModelConfig(frames=19)
    pruner = TPM_REGISTRY["dpc_knn"](cfg).eval()

    class Keep(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pruner(x, 6, torch.arange(19).expand(x.shape[0], 19))[1]

    x = torch.randn(2, 19, 3, 8)
    eager = Keep()(x)
    program = torch.export.export(Keep(), (x,))
    assert all(type(v) is torch.Tensor for v in _LENGTH_CONSTANTS.values()), "a traced tensor was cached"
    assert torch.equal(program.module()(x), eager)
    assert torch.equal(Keep()(x), eager)
