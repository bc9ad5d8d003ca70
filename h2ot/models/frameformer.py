"""A frame-token video pose transformer with the Hierarchical Hourglass Tokenizer.

Each frame's whole 2D pose is one token, as in the temporal encoders of PoseFormer, the Strided Transformer and
MHFormer: the J x in_channels keypoints of a frame are embedded together to `dim` channels, plus a learned
temporal position code, then `depth` pre-norm transformer blocks attend over the T frame tokens and a linear head
lifts every output token to [J, 3]. The schedule's TPMs prune frame tokens before a block and the TRM restores T
at the end, exactly as for the joint-token backbones: the Hourglass sees tokens [B, T, 1, C] (one token a frame).

Why it is here: on CPU a frame token costs the same as one of MixSTE's J joint tokens, so a block over T frame
tokens is ~J times cheaper than MixSTE's spatial + temporal pair, and the first Linear sees the whole body as the
per-frame MLP floor does (docs/RESULTS.md). Initialisation: PyTorch's Linear default, which learned faster than
the ViT N(0, 0.02) one in the CPU probes of docs/RESULTS.md (with 34 inputs its embedding biases stay small).
Input [B, T, J, in_channels] -> PoseOutput with pose_3d [B, T_out, J, 3].
"""

from __future__ import annotations

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.hourglass import Hourglass
from h2ot.layers import Block
from h2ot.models.base import (
    CostTerms,
    PoseOutput,
    block_linear_macs,
    drop_path_rates,
    prepare_input,
    register_model,
)


@register_model("frameformer")
class FrameFormer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.embed = nn.Linear(cfg.joints * cfg.in_channels, dim)
        self.temporal_pos = nn.Parameter(torch.zeros(1, cfg.frames, 1, dim))
        nn.init.trunc_normal_(self.temporal_pos, std=0.02)
        drop = drop_path_rates(cfg)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, drop[i]) for i in range(cfg.depth)
        )
        self.hourglass = Hourglass(cfg, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.joints * 3)

    @classmethod
    def cost_terms(cls, cfg: ModelConfig) -> CostTerms:
        """Per frame token and block 4 C^2 (qkv, proj) + 2 C hidden (MLP) MACs; embedding J C_in C, head C J 3."""
        return CostTerms(
            block_linear_macs=block_linear_macs(cfg), spatial_attentions=0, temporal_attentions=1,
            input_linear_macs=cfg.joints * cfg.in_channels * cfg.dim, output_linear_macs=cfg.dim * cfg.joints * 3,
            tokens_per_frame=1,
        )

    def forward(self, x: torch.Tensor) -> PoseOutput:
        x = prepare_input(x, self.cfg)
        b, _, j, _ = x.shape
        h = self.embed(x.flatten(2))[:, :, None] + self.temporal_pos  # [B, T, 1, C]: one token a frame
        state = self.hourglass.start(h)
        for i, block in enumerate(self.blocks):
            h = self.hourglass.before_block(h, i, state)
            sink = self.hourglass.attention_sink(i, state)  # set when the next block prunes by attention
            h = block(h[:, :, 0], sink)[:, :, None]
        h, frame_indices = self.hourglass.finish(self.norm(h), state)
        pose = self.head(h[:, :, 0]).reshape(b, h.shape[1], j, 3)
        return PoseOutput(pose, state.kept_indices, frame_indices)
