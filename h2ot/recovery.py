"""Token Recovering Modules (TRM): restore all T frames from the n kept ones.

Interface: forward(x_kept [B, n, J, C], kept_indices [B, n] original frame positions, frames T) -> [B, T, J, C].
Registry: TRM_REGISTRY["cross_attention" | "linear" | "nearest"].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.layers import CrossAttention, from_temporal, temporal_tokens

TRM_REGISTRY: dict[str, type[nn.Module]] = {}


def register_trm(name: str) -> Callable:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        TRM_REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def build_trm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.trm not in TRM_REGISTRY:
        from h2ot.config import ConfigError

        raise ConfigError(f"model.trm: unknown recovering strategy {cfg.trm!r}; known: {sorted(TRM_REGISTRY)}")
    return TRM_REGISTRY[cfg.trm](cfg, dim)


@register_trm("cross_attention")
class CrossAttentionRecovery(nn.Module):
    """T learnable zero-initialised queries; per joint, multi-head cross-attention over the kept tokens.

    queries [B*J, T, C] attend to the kept tokens [B*J, n, C]; the result is added to the queries (residual),
    no FFN. A learnable temporal position code on the queries tells them which frame they stand for.
    """

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.frames = cfg.frames
        self.queries = nn.Parameter(torch.zeros(1, cfg.frames, dim))
        self.query_pos = nn.Parameter(torch.zeros(1, cfg.frames, dim))
        nn.init.trunc_normal_(self.query_pos, std=0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, cfg.heads)

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        b, _, j, c = x_kept.shape
        if frames != self.frames:
            raise ValueError(f"cross_attention TRM was built for {self.frames} frames, asked for {frames}")
        queries = (self.queries + self.query_pos).expand(b * j, frames, c)
        context = temporal_tokens(x_kept)
        out = queries + self.attn(self.norm_q(queries), self.norm_kv(context))
        return from_temporal(out, b, j)


def _neighbours(kept_indices: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every frame t of [0, frames): (t [B, T], left, right [B, T]): the positions among the kept frames of
    the last kept index < t and the first kept index >= t (clamped to the ends)."""
    b, n = kept_indices.shape
    t = torch.arange(frames, device=kept_indices.device).expand(b, frames).contiguous()
    right = torch.searchsorted(kept_indices.contiguous(), t).clamp(max=n - 1)
    return t, (right - 1).clamp(min=0), right


def _take(x_kept: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x_kept [B, N, J, C] at positions pos [B, T] -> [B, T, J, C]."""
    b, _, j, c = x_kept.shape
    return torch.gather(x_kept, 1, pos[:, :, None, None].expand(b, pos.shape[1], j, c))


@register_trm("linear")
class LinearRecovery(nn.Module):
    """Linear interpolation in time between the kept frames (original indices); the first/last kept frame
    is held beyond them. No parameters."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        t, left, right = _neighbours(kept_indices, frames)
        right_t = torch.gather(kept_indices, 1, right).float()
        left_t = torch.gather(kept_indices, 1, left).float()
        span = (right_t - left_t).clamp(min=1.0)
        w = ((t.float() - left_t) / span).clamp(0.0, 1.0)  # 0 before the first kept frame: hold it
        w = torch.where(right_t <= t.float(), torch.ones_like(w), w)  # beyond the last kept: hold it
        w = w[:, :, None, None].to(x_kept.dtype)
        return _take(x_kept, left) * (1 - w) + _take(x_kept, right) * w


@register_trm("nearest")
class NearestRecovery(nn.Module):
    """Each frame copies the kept frame nearest to it in time (original indices; the earlier one on a tie).
    No parameters."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        t, left, right = _neighbours(kept_indices, frames)
        to_left = (t - torch.gather(kept_indices, 1, left)).abs()
        to_right = (torch.gather(kept_indices, 1, right) - t).abs()
        return _take(x_kept, torch.where(to_left <= to_right, left, right))
