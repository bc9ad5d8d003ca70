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
        # A stable sort ranks equal scores by frame index, so selection is deterministic.
        local = scores.argsort(dim=1, descending=True, stable=True)[:, :n].sort(dim=1).values  # time order
        kept = torch.gather(x, 1, local[:, :, None, None].expand(b, n, j, c))
        return kept, torch.gather(frame_indices, 1, local)


@register_tpm("dpc_knn")
class DpcKnnPruner(TokenPruner):
    """Density-peaks clustering with k nearest neighbours (HoT): keep cluster centres of the frame features.

    1. frame feature = mean of its joint tokens; 2. distances / sqrt(C); 3. density rho = exp(-mean of the
    squared distances to the k nearest neighbours, self included); 4. delta = distance to the nearest denser
    frame (the densest frame gets the largest distance of the sample); 5. score rho * delta.
    Ties are broken by frame index (an exact index-based order, not random noise), so evaluation is
    deterministic.
    """

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        t, c = x.shape[1], x.shape[3]
        feat = x.mean(dim=2).float()  # [B, T', C]
        dist = torch.cdist(feat, feat) / math.sqrt(c)  # [B, T', T']
        k = min(self.cfg.tpm_k, t)
        knn_sq = dist.pow(2).topk(k, dim=-1, largest=False).values
        density = torch.exp(-knn_sq.mean(dim=-1))
        # [i, j]: j is denser than i; equal densities are ordered by frame index (exact, deterministic).
        rho_i, rho_j = density[:, :, None], density[:, None, :]
        later = torch.arange(t, device=x.device)
        denser = (rho_j > rho_i) | ((rho_j == rho_i) & (later[None, :] > later[:, None]))
        max_dist = dist.flatten(1).max(dim=1).values[:, None, None]
        delta = torch.where(denser, dist, max_dist).min(dim=-1).values
        return density * delta


@register_tpm("uniform")
class UniformPruner(TokenPruner):
    """Keep n frames evenly spaced over the current tokens (first and last included)."""

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        b, t = x.shape[:2]
        picks = torch.linspace(0, t - 1, n, device=x.device).round().long()
        scores = torch.zeros(b, t, device=x.device)
        scores[:, picks] = 1.0
        return scores
