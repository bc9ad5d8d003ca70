"""MotionBERT's DSTformer (ICCV'23) with the Hierarchical Hourglass Tokenizer: dual-stream spatio-temporal blocks.

Input [B, T, J, in_channels] 2D keypoints (x, y, confidence) -> PoseOutput with pose_3d [B, T_out, J, 3].
Each of the `depth` blocks runs two streams on the same tokens: spatial -> temporal and temporal -> spatial (each a
pre-norm attention + MLP sub-block over the J joints of a frame, or the T' frames of a joint), and fuses them per
token with learned weights alpha = softmax(Linear([x_st, x_ts])) over the two streams (initialised equal). Then
LayerNorm, the TRM (seq2seq), pre-logits Linear(C, rep_dim) + tanh, and a linear head to 3 coordinates.
The schedule's TPMs prune frames before a block (both streams then see the kept tokens).
MotionBERT's Human3.6M configs use C = 256, mlp_ratio 4, depth 5, 8 heads, rep_dim 512 (the "dstformer" preset).
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


class DualStreamBlock(nn.Module):
    """x [B, T', J, C] -> fused [B, T', J, C] of the spatial->temporal and temporal->spatial streams."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()

        def block() -> Block:
            return Block(dim, heads, mlp_ratio, dropout, drop_path)

        self.st_spatial, self.st_temporal = block(), block()
        self.ts_temporal, self.ts_spatial = block(), block()
        self.fuse = nn.Linear(2 * dim, 2)  # per-token logits of the two streams
        self.reset_fuse()

    def reset_fuse(self) -> None:
        """Both streams weighted equally at the start."""
        nn.init.zeros_(self.fuse.weight)
        nn.init.constant_(self.fuse.bias, 0.5)

    def forward(self, x: torch.Tensor, attn_sink: dict | None = None) -> torch.Tensor:
        """attn_sink: passed to both temporal attentions (their received attention is summed there)."""
        b, t, j, c = x.shape
        st = self.st_spatial(spatial_tokens(x)).reshape(b, t, j, c)
        st = from_temporal(self.st_temporal(temporal_tokens(st), attn_sink), b, j)
        ts = from_temporal(self.ts_temporal(temporal_tokens(x), attn_sink), b, j)
        ts = self.ts_spatial(spatial_tokens(ts)).reshape(b, t, j, c)
        alpha = self.fuse(torch.cat([st, ts], dim=-1)).softmax(dim=-1)  # [B, T', J, 2]
        return st * alpha[..., 0:1] + ts * alpha[..., 1:2]


@register_model("dstformer")
class DSTformer(JointTokenBackbone):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        dim = cfg.dim
        drop = drop_path_rates(cfg)
        self.blocks = nn.ModuleList(
            DualStreamBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, drop[i]) for i in range(cfg.depth)
        )
        self.hourglass = Hourglass(cfg, dim)
        self.norm = nn.LayerNorm(dim)
        if cfg.rep_dim > 0:
            self.pre_logits = nn.Sequential(nn.Linear(dim, cfg.rep_dim), nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(cfg.rep_dim or dim, 3)
        self.apply(init_transformer_weights)
        for block in self.blocks:
            block.reset_fuse()

    @classmethod
    def cost_terms(cls, cfg: ModelConfig) -> CostTerms:
        """Per block two streams of a spatial and a temporal sub-block (4 C^2 + 2 C hidden MACs per token each)
        and the fusion Linear(2C, 2); the output runs pre-logits (C x rep_dim) and head per output token."""
        c, rep = cfg.dim, cfg.rep_dim
        sub_block = block_linear_macs(cfg)
        return CostTerms(
            block_linear_macs=4 * sub_block + 2 * c * 2, spatial_attentions=2, temporal_attentions=2,
            input_linear_macs=cfg.in_channels * c, output_linear_macs=c * rep + 3 * rep if rep > 0 else 3 * c,
        )

    def forward(self, x: torch.Tensor) -> PoseOutput:
        h = self.embed_tokens(x)
        state = self.hourglass.start(h)
        for i, block in enumerate(self.blocks):
            h = self.hourglass.before_block(h, i, state)
            h = block(h, self.hourglass.attention_sink(i, state))
        h, frame_indices = self.hourglass.finish(self.norm(h), state)
        return PoseOutput(self.head(self.pre_logits(h)), state.kept_indices, frame_indices)
