"""MixSTE (CVPR'22) with the Hierarchical Hourglass Tokenizer: alternating spatial and temporal blocks.

Input [B, T, J, in_channels] 2D keypoints (x, y[, confidence]) -> PoseOutput with pose_3d [B, T_out, J, 3].
Each of the `depth` loops is one spatial block (over the J joints of a frame) and one temporal block (over the
T' frames of a joint); the schedule's TPMs prune frames before a loop, the TRM restores T at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.hourglass import Hourglass
from h2ot.layers import Block, from_temporal, init_transformer_weights, spatial_tokens, temporal_tokens
from h2ot.models.base import (
    CostTerms,
    JointTokenBackbone,
    PoseOutput,
    block_linear_macs,
    drop_path_rates,
    register_model,
)


@register_model("mixste")
class MixSTE(JointTokenBackbone):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        dim = cfg.dim
        drop = drop_path_rates(cfg)
        self.spatial_blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, drop[i]) for i in range(cfg.depth)
        )
        self.temporal_blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, drop[i]) for i in range(cfg.depth)
        )
        self.hourglass = Hourglass(cfg, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.apply(init_transformer_weights)

    @classmethod
    def cost_terms(cls, cfg: ModelConfig) -> CostTerms:
        """Per loop one spatial and one temporal block, each 4 C^2 (qkv, proj) + 2 C hidden (MLP) MACs per token."""
        return CostTerms(
            block_linear_macs=2 * block_linear_macs(cfg), spatial_attentions=1, temporal_attentions=1,
            input_linear_macs=cfg.in_channels * cfg.dim, output_linear_macs=3 * cfg.dim,
        )

    def forward(self, x: torch.Tensor) -> PoseOutput:
        b, _, j, _ = x.shape
        h = self.embed_tokens(x)
        state = self.hourglass.start(h)
        for i in range(self.cfg.depth):
            h = self.hourglass.before_block(h, i, state)
            t = h.shape[1]
            h = self.spatial_blocks[i](spatial_tokens(h)).reshape(b, t, j, -1)
            sink = self.hourglass.attention_sink(i, state)  # set when the next block prunes by attention
            h = from_temporal(self.temporal_blocks[i](temporal_tokens(h), sink), b, j)
        h, frame_indices = self.hourglass.finish(self.norm(h), state)
        return PoseOutput(self.head(h), state.kept_indices, frame_indices)
