"""Token Recovering Modules (TRM): restore all T frames from the n kept ones.

Interface: forward(x_kept [B, n, J, C], kept_indices [B, n] original frame positions, frames T) -> [B, T, J, C].
Registry: TRM_REGISTRY["cross_attention" | "linear" | "nearest"]; every strategy subclasses `TokenRecovery`, which
states its costs for h2ot.flops and whether it exports to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.layers import CrossAttention, from_temporal, temporal_tokens
from h2ot.registry import Registry

TRM_REGISTRY: Registry[type[TokenRecovery]] = Registry("recovering strategy", key="model.trm")


def register_trm(name: str) -> Callable:
    def decorator(cls: type[TokenRecovery]) -> type[TokenRecovery]:
        TRM_REGISTRY.register(name, cls)
        cls.name = name
        return cls

    return decorator


def build_trm(cfg: ModelConfig, dim: int) -> TokenRecovery:
    return TRM_REGISTRY.get(cfg.trm)(cfg, dim)


class TokenRecovery(nn.Module):
    """Base class: subclasses implement `forward(x_kept, kept_indices, frames) -> [B, T, J, C]` and state their
    cost (in MACs per token of a frame; h2ot.flops multiplies by the tokens a frame holds)."""

    name = "base"
    exportable = True  # False: cannot be written as one ONNX graph (h2ot.export names it)

    @classmethod
    def linear_macs(cls, cfg: ModelConfig, frames: int, kept: int) -> int:
        """MACs of the strategy's Linear layers per token of a frame, restoring `frames` from `kept`."""
        return 0

    @classmethod
    def attention_macs(cls, cfg: ModelConfig, frames: int, kept: int) -> int:
        """MACs of the strategy's attention products (QK^T and AV) per token of a frame."""
        return 0

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        raise NotImplementedError


@register_trm("cross_attention")
class CrossAttentionRecovery(TokenRecovery):
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

    @classmethod
    def linear_macs(cls, cfg: ModelConfig, frames: int, kept: int) -> int:
        """T queries, n keys and values and T outputs, C^2 MACs each."""
        c = cfg.dim
        return frames * c * c + 2 * kept * c * c + frames * c * c

    @classmethod
    def attention_macs(cls, cfg: ModelConfig, frames: int, kept: int) -> int:
        """QK^T and AV over T queries and n keys: 2 T n C."""
        return 2 * frames * kept * cfg.dim

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
    the last kept index < t and the first kept index >= t (clamped to the ends).

    The first kept index >= t sits at the count of kept indices < t (they are sorted): a comparison and a sum,
    which export to ONNX where searchsorted does not."""
    b, n = kept_indices.shape
    t = torch.arange(frames, device=kept_indices.device).expand(b, frames)
    right = (kept_indices[:, None, :] < t[:, :, None]).sum(dim=2).clamp(max=n - 1)  # [B, T]
    return t, (right - 1).clamp(min=0), right


def _take(x_kept: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x_kept [B, N, J, C] at positions pos [B, T] -> [B, T, J, C]."""
    b, _, j, c = x_kept.shape
    return torch.gather(x_kept, 1, pos[:, :, None, None].expand(b, pos.shape[1], j, c))


@register_trm("linear")
class LinearRecovery(TokenRecovery):
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
class NearestRecovery(TokenRecovery):
    """Each frame copies the kept frame nearest to it in time (original indices; the earlier one on a tie).
    No parameters."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        t, left, right = _neighbours(kept_indices, frames)
        to_left = (t - torch.gather(kept_indices, 1, left)).abs()
        to_right = (torch.gather(kept_indices, 1, right) - t).abs()
        return _take(x_kept, torch.where(to_left <= to_right, left, right))
