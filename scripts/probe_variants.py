"""The exploratory model variants of docs/RESULTS.md ("How the frame-token model was found"), as recipe probes.

usage: VARIANT=NAME[+NAME...] python scripts/probe_variants.py PROBE_NAME [recipe_probe.py options]

Runs `scripts/recipe_probe.py` with its model patched after it is built. None of these is a shipped option; they
are kept so the probe table can be reproduced. Variants:
  poseemb    joint-token backbones: add Linear(J x C_in -> C) of the whole frame's pose to every joint token
  perjoint   joint-token backbones: a separate 2 -> C embedding per joint instead of one shared Linear
  xavier     Xavier-uniform q/k/v weights in every attention
  definit    PyTorch's default Linear initialisation instead of the ViT one (embedding biases zeroed)
  vitinit    the frame-token model with the ViT N(0, 0.02) initialisation instead of PyTorch's default
  zeroproj   every attention's output projection zero-initialised (each block starts as its MLP alone)
  mlpt       the per-frame MLP floor with a temporal attention (pre-norm, residual) before each residual block
             (use with config=configs/mlp_small.yaml; combine with zeroproj)
  mlptail    the per-frame MLP floor followed by one pre-norm transformer block over its T frame features (with a
             temporal position code) before the head (use with config=configs/mlp_small.yaml)
  convK      frame-token and MLP models: the per-frame embedding Linear becomes a temporal Conv1d of kernel K
             (replicate padding), so every token starts with its K-frame neighbourhood, e.g. conv5
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import recipe_probe  # noqa: E402

from h2ot.layers import Attention, Block, init_transformer_weights  # noqa: E402
from h2ot.models import build_model  # noqa: E402
from h2ot.models.base import PoseOutput, prepare_input  # noqa: E402
from h2ot.models.mlp import MLPLifter  # noqa: E402


class PoseEmbedding(nn.Module):
    """The shared per-joint embedding plus a Linear of the whole frame's pose, broadcast to every joint."""

    def __init__(self, shared: nn.Linear, joints: int, in_channels: int, dim: int):
        super().__init__()
        self.shared = shared
        self.pose = nn.Linear(joints * in_channels, dim)
        init_transformer_weights(self.pose)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x) + self.pose(x.flatten(2))[:, :, None, :]


class PerJointEmbedding(nn.Module):
    def __init__(self, joints: int, in_channels: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(joints, in_channels, dim), std=0.02))
        self.bias = nn.Parameter(torch.zeros(joints, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btjc,jcd->btjd", x, self.weight) + self.bias


class TemporalConvEmbedding(nn.Module):
    """[B, T, J*C_in] -> [B, T, dim]: a Conv1d over time in place of the per-frame Linear."""

    def __init__(self, in_features: int, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(in_features, dim, kernel, padding=kernel // 2, padding_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class TemporalMLP(MLPLifter):
    """The MLP floor with a temporal attention over the T frames before each residual block."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.depth))
        self.attns = nn.ModuleList(Attention(cfg.dim, 8) for _ in range(cfg.depth))
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, cfg.frames, cfg.dim), std=0.02))

    def forward(self, x: torch.Tensor) -> PoseOutput:
        x = prepare_input(x, self.cfg)
        b, t, j, _ = x.shape
        h = self.embed(x.flatten(2)) + self.pos
        for norm, attn, block in zip(self.norms, self.attns, self.blocks):
            h = block(h + attn(norm(h)))
        return PoseOutput(self.head(h).reshape(b, t, j, 3), [], torch.arange(t).expand(b, t))


class MLPTail(MLPLifter):
    """The MLP floor's per-frame trunk, then one transformer block over the T frames, then the head."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, cfg.frames, cfg.dim), std=0.02))
        self.tail = Block(cfg.dim, 8, 2.0)

    def forward(self, x: torch.Tensor) -> PoseOutput:
        x = prepare_input(x, self.cfg)
        b, t, j, _ = x.shape
        h = self.tail(self.blocks(self.embed(x.flatten(2))) + self.pos)
        return PoseOutput(self.head(h).reshape(b, t, j, 3), [], torch.arange(t).expand(b, t))


def patched_build(cfg) -> nn.Module:
    variants = set(filter(None, os.environ.get("VARIANT", "").split("+")))
    model = TemporalMLP(cfg) if "mlpt" in variants else MLPTail(cfg) if "mlptail" in variants else build_model(cfg)
    for v in variants:
        if v.startswith("conv"):
            model.embed = TemporalConvEmbedding(model.embed.in_features, model.embed.out_features, int(v[4:]))
    if "vitinit" in variants:
        model.apply(init_transformer_weights)
    if "definit" in variants:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        nn.init.zeros_(model.embed.bias)
    if "perjoint" in variants:
        model.embed = PerJointEmbedding(cfg.joints, cfg.in_channels, cfg.dim)
    if "poseemb" in variants:
        model.embed = PoseEmbedding(model.embed, cfg.joints, cfg.in_channels, cfg.dim)
    for m in model.modules():
        if isinstance(m, Attention) and "xavier" in variants:
            nn.init.xavier_uniform_(m.qkv.weight)
        if isinstance(m, Attention) and "zeroproj" in variants:
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
    return model


if __name__ == "__main__":
    recipe_probe.build_model = patched_build
    sys.exit(recipe_probe.main(sys.argv[1:]))
