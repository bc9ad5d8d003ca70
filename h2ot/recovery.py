"""Token Recovering Modules (TRM): restore all T frames from the n kept ones.

Interface: forward(x_kept [B, n, J, C], kept_indices [B, n] original frame positions, frames T) -> [B, T, J, C].
Registry: TRM_REGISTRY["cross_attention" | "linear" | "nearest"]; every strategy subclasses `TokenRecovery`, which
states its costs for h2ot.flops and whether it exports to ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from h2ot.config import ModelConfig
from h2ot.layers import CrossAttention, from_temporal, temporal_tokens
from h2ot.pruning import frame_positions, index_constant, length_constant, take_frames
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
        """MACs of the strategy's other matrix products per token of a frame (attention's QK^T and AV; the linear
        TRM's interpolation product): those torch's FlopCounterMode counts beside the Linear layers."""
        return 0

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        raise NotImplementedError

    def recover_fixed(self, x_kept: torch.Tensor, kept: tuple[int, ...], frames: int) -> torch.Tensor:
        """forward for kept original indices that are the same in every clip, constants of the schedule (a TPM
        that keeps fixed positions; h2ot.hourglass): strategies that can precompute from them override this."""
        return self(x_kept, index_constant(kept, x_kept.device).expand(x_kept.shape[0], -1), frames)


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
    t = frame_positions(frames, kept_indices.device).expand(b, frames)
    right = (kept_indices[:, None, :] < t[:, :, None]).sum(dim=2).clamp(max=n - 1)  # [B, T]
    return t, (right - 1).clamp(min=0), right


def _frame_column(frames: int, device: torch.device) -> torch.Tensor:
    """[T, 1] float32: the frame positions as a column."""
    return torch.arange(frames, dtype=torch.float32, device=device)[:, None]


def interpolation_weights(kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T, n] float32: the weight of kept frame m in frame t under linear interpolation in time between the
    kept frames (sorted original indices [B, n]), the first / last kept frame held before / after them.

    Kept frame m's weight is a hat: 1 at its own index k_m, falling linearly to 0 at the previous and at the next
    kept index (never, before the first or after the last: a neighbour at inf), 1 - (t - k_m) / (k_next - k_m)
    after it and 1 - (t - k_m) / (k_prev - k_m) before it. So every row holds 1 - w at its left neighbour and w at
    its right one, and the recovered frames are one matrix product (LinearRecovery)."""
    k = kept_indices.float().unsqueeze(1)  # [B, 1, n]
    offset = length_constant("frame_column", frames, kept_indices.device, _frame_column) - k  # [B, T, n]: t - k_m
    padded = F.pad(k, (1, 1), value=math.inf)  # [B, 1, n + 2]: the kept indices between two at inf
    to_neighbour = torch.where(offset >= 0, padded[..., 2:], padded[..., :-2]) - k  # k_next - k_m, k_prev - k_m
    return (1 - offset / to_neighbour).clamp(min=0)


@register_trm("linear")
class LinearRecovery(TokenRecovery):
    """Linear interpolation in time between the kept frames (original indices); the first/last kept frame
    is held beyond them. No parameters.

    One matrix product of the interpolation weights [B, T, n] (interpolation_weights) with the kept tokens: a
    handful of ops whatever the sizes, which is what a batch-1 forward pays for (a weight of 0 times a token is
    0, so a non-finite token would reach every frame; the models' tokens are finite)."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()

    @classmethod
    def attention_macs(cls, cfg: ModelConfig, frames: int, kept: int) -> int:
        """The interpolation product: [T, n] weights times the n kept tokens of C channels."""
        return frames * kept * cfg.dim

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        return _interpolate(interpolation_weights(kept_indices, frames), x_kept)

    def recover_fixed(self, x_kept: torch.Tensor, kept: tuple[int, ...], frames: int) -> torch.Tensor:
        """The weights [T, n] of constant kept indices are a constant too: the recovery is one matrix product."""
        weights = length_constant(
            ("linear_trm", kept), frames, x_kept.device,
            lambda t, device: interpolation_weights(index_constant(kept, device)[None], t)[0],
        )
        return _interpolate(weights, x_kept)


def _interpolate(weights: torch.Tensor, x_kept: torch.Tensor) -> torch.Tensor:
    """weights [B, T, n] or [T, n] (the same for every clip) times the kept tokens [B, n, J, C] -> [B, T, J, C]."""
    b, n, j, c = x_kept.shape
    if weights.dtype != x_kept.dtype:
        weights = weights.to(x_kept.dtype)
    return torch.matmul(weights, x_kept.reshape(b, n, j * c)).reshape(b, -1, j, c)


@register_trm("nearest")
class NearestRecovery(TokenRecovery):
    """Each frame copies the kept frame nearest to it in time (original indices; the earlier one on a tie).
    No parameters."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()

    def forward(self, x_kept: torch.Tensor, kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
        return take_frames(x_kept, _nearest(kept_indices, frames))

    def recover_fixed(self, x_kept: torch.Tensor, kept: tuple[int, ...], frames: int) -> torch.Tensor:
        """The nearest kept frame of every frame is a constant for constant kept indices: one index_select."""
        nearest = length_constant(
            ("nearest_trm", kept), frames, x_kept.device,
            lambda t, device: _nearest(index_constant(kept, device)[None], t)[0],
        )
        return x_kept.index_select(1, nearest)


def _nearest(kept_indices: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T]: for every frame, the position among the kept frames of the one nearest in time (the earlier on a tie)."""
    t, left, right = _neighbours(kept_indices, frames)
    to_left = (t - torch.gather(kept_indices, 1, left)).abs()
    to_right = (torch.gather(kept_indices, 1, right) - t).abs()
    return torch.where(to_left <= to_right, left, right)
