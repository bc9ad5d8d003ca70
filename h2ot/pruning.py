"""Token Pruning Modules (TPM): choose which frame tokens to keep.

Each strategy scores the current frame tokens (higher = keep); `TokenPruner.forward` keeps the top-n,
re-sorts them in time order, gathers their joint tokens and maps the kept positions back to ORIGINAL frame
indices. Frames in `must_keep` (the centre frame of seq2frame models) are always kept.
Registry: TPM_REGISTRY["dpc_knn" | "uniform" | ...].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from h2ot.config import ModelConfig

TPM_REGISTRY: dict[str, type[TokenPruner]] = {}

# Tie-breaks are tiny index-based terms (not noise), so evaluation is deterministic.
_TIE_EPS = 1e-6


def register_tpm(name: str) -> Callable:
    def decorator(cls: type[TokenPruner]) -> type[TokenPruner]:
        TPM_REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def build_tpm(cfg: ModelConfig) -> TokenPruner:
    if cfg.tpm not in TPM_REGISTRY:
        from h2ot.config import ConfigError

        raise ConfigError(f"model.tpm: unknown pruning strategy {cfg.tpm!r}; known: {sorted(TPM_REGISTRY)}")
    return TPM_REGISTRY[cfg.tpm](cfg)


def _index_ramp(b: int, t: int, device: torch.device) -> torch.Tensor:
    """[B, T] values in [0, 1) increasing with the frame position."""
    return (torch.arange(t, device=device, dtype=torch.float32) / t).expand(b, t)


class TokenPruner(nn.Module):
    """Base class: subclasses implement `scores(x, n, context) -> [B, T']`."""

    name = "base"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        n: int,
        frame_indices: torch.Tensor,
        must_keep: torch.Tensor | None = None,
        context: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep n frames. x: [B, T', J, C]; frame_indices: [B, T'] original positions of those tokens.

        Returns (x_kept [B, n, J, C], kept original indices [B, n], sorted in time).
        """
        b, t, j, c = x.shape
        if n > t:
            raise ValueError(f"cannot keep {n} tokens of {t}")
        scores = self.scores(x, n, context or {}).float()
        if must_keep is not None:
            scores = scores.masked_fill(must_keep, math.inf)
        local = scores.topk(n, dim=1).indices.sort(dim=1).values  # time order
        kept = torch.gather(x, 1, local[:, :, None, None].expand(b, n, j, c))
        return kept, torch.gather(frame_indices, 1, local)


@register_tpm("dpc_knn")
class DpcKnnPruner(TokenPruner):
    """Density-peaks clustering with k nearest neighbours (HoT): keep cluster centres of the frame features.

    1. frame feature = mean of its joint tokens; 2. distances / sqrt(C); 3. density rho = exp(-mean of the
    squared distances to the k nearest neighbours, self included); 4. delta = distance to the nearest denser
    frame (the densest frame gets the largest distance of the sample); 5. score rho * delta.
    """

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        b, t, _, c = x.shape
        feat = x.mean(dim=2).float()  # [B, T', C]
        dist = torch.cdist(feat, feat) / math.sqrt(c)  # [B, T', T']
        k = min(self.cfg.tpm_k, t)
        knn_sq = dist.pow(2).topk(k, dim=-1, largest=False).values
        ramp = _index_ramp(b, t, x.device)
        density = torch.exp(-knn_sq.mean(dim=-1)) + _TIE_EPS * ramp
        denser = density[:, None, :] > density[:, :, None]  # [i, j]: j is denser than i
        max_dist = dist.flatten(1).max(dim=1).values[:, None, None]
        delta = torch.where(denser, dist, max_dist).min(dim=-1).values
        return density * delta + _TIE_EPS * 1e-3 * (1 - ramp)


@register_tpm("uniform")
class UniformPruner(TokenPruner):
    """Keep n frames evenly spaced over the current tokens (first and last included)."""

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        b, t = x.shape[:2]
        picks = torch.linspace(0, t - 1, n, device=x.device).round().long()
        scores = -_TIE_EPS * _index_ramp(b, t, x.device).clone()
        scores[:, picks] = 1.0
        return scores
