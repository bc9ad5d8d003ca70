"""The per-frame MLP lifter ("a simple yet effective baseline", Martinez et al. ICCV'17): the accuracy floor.

Each frame is lifted on its own: its J 2D joints [J, in_channels] are flattened, embedded to `dim` channels,
passed through `depth` residual blocks (two Linear -> LayerNorm -> ReLU -> Dropout layers each) and projected to
[J, 3]. No frame sees another, so the model has no temporal context and no frame tokens to prune (its schedule
must be empty). LayerNorm instead of the original BatchNorm keeps it batch-size independent under DDP.
Input [B, T, J, in_channels] -> PoseOutput with pose_3d [B, T_out, J, 3] (T_out = 1 with seq2frame).
"""

from __future__ import annotations

import torch
from torch import nn

from h2ot.config import ConfigError, ModelConfig
from h2ot.models.base import CostTerms, PoseOutput, prepare_input, register_model


class ResidualBlock(nn.Module):
    """x + Drop(ReLU(LN(W2 Drop(ReLU(LN(W1 x))))))."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


@register_model("mlp")
class MLPLifter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.schedule:
            raise ConfigError("model.schedule: the per-frame mlp has no frame tokens to prune; use schedule: []")
        self.cfg = cfg
        self.embed = nn.Linear(cfg.joints * cfg.in_channels, cfg.dim)
        self.blocks = nn.Sequential(*(ResidualBlock(cfg.dim, cfg.dropout) for _ in range(cfg.depth)))
        self.head = nn.Linear(cfg.dim, cfg.joints * 3)

    @classmethod
    def cost_terms(cls, cfg: ModelConfig) -> CostTerms:
        """Per frame: embedding J*C_in*dim, `depth` blocks of 2 dim^2, head dim*J*3 MACs, as per joint token
        (divided by J). seq2frame lifts only the centre frame: the per-T-frame terms are divided by T."""
        share = 1.0 / cfg.frames if cfg.seq2frame else 1.0
        return CostTerms(
            block_linear_macs=2 * cfg.dim * cfg.dim / cfg.joints * share, spatial_attentions=0,
            temporal_attentions=0, input_linear_macs=cfg.in_channels * cfg.dim * share,
            output_linear_macs=3 * cfg.dim,
        )

    def forward(self, x: torch.Tensor) -> PoseOutput:
        x = prepare_input(x, self.cfg)
        b, t, j, _ = x.shape
        if self.cfg.seq2frame:
            x = x[:, t // 2 : t // 2 + 1]
            frame_indices = torch.full((b, 1), t // 2, dtype=torch.long, device=x.device)
        else:
            frame_indices = torch.arange(t, device=x.device).expand(b, t)
        h = self.blocks(self.embed(x.flatten(2)))  # [B, T_out, dim]
        return PoseOutput(self.head(h).reshape(b, x.shape[1], j, 3), [], frame_indices)
