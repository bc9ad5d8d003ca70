"""FLOPs per clip, in the two conventions of METHOD.md (2 x MACs, forward pass, batch 1).

- linear: what the papers report (Linear layers only): counted with forward hooks on every nn.Linear.
- total: torch's FlopCounterMode under the math attention backend (so attention products are seen), plus the
  pruning's own cost (cdist and density terms), which the counter does not see, added by hand.
And the analytic prediction of the linear count from the schedule's kept-token counts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from h2ot.config import ModelConfig
from h2ot.schedule import tokens_per_block, validate_schedule


def _dummy_input(cfg: ModelConfig) -> torch.Tensor:
    return torch.randn(1, cfg.frames, cfg.joints, cfg.in_channels)


def linear_flops(model: nn.Module, x: torch.Tensor) -> int:
    """2 x MACs of every nn.Linear in one forward pass of x."""
    total = 0

    def hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def pruning_flops(cfg: ModelConfig) -> int:
    """Hand count of what FlopCounterMode misses in the TPMs: per stage the frame mean (T'JC), pairwise
    distances (3 T'^2 C) and the density / delta terms (~4 T'^2)."""
    stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
    total, current = 0, cfg.frames
    for _, n in stages:
        total += current * cfg.joints * cfg.dim + 3 * current * current * cfg.dim + 4 * current * current
        current = n
    return total


def total_flops(model: nn.Module, x: torch.Tensor, cfg: ModelConfig) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return int(counter.get_total_flops()) + pruning_flops(cfg)


def predicted_linear_flops(cfg: ModelConfig) -> int:
    """Analytic Linear-layer FLOPs of a MixSTE-style model from its kept-token counts (per clip, 2 x MACs).

    Each spatial/temporal block costs (4 + 2 * mlp_ratio) C^2 MACs per token; the cross-attention TRM
    projects T queries, n keys and values and T outputs (C^2 each); embedding and head are per output token.
    """
    c, j, t = cfg.dim, cfg.joints, cfg.frames
    stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
    per_token = (4 + 2 * cfg.mlp_ratio) * c * c
    macs = sum(2 * n * j * per_token for n in tokens_per_block(stages, cfg.depth, t))
    macs += t * j * cfg.in_channels * c  # embedding
    out_frames = 1 if cfg.seq2frame else t
    macs += out_frames * j * c * 3  # head
    if stages and not cfg.seq2frame and cfg.trm == "cross_attention":
        n_last = stages[-1][1]
        macs += j * (t * c * c + 2 * n_last * c * c + t * c * c)
    return int(2 * macs)


def predicted_total_flops(cfg: ModelConfig) -> int:
    """Analytic total FLOPs: the Linear count plus the attention products (QK^T and AV, 2 x 2 L^2 C per
    sequence) of every block and of the cross-attention TRM, plus the pruning's hand count."""
    c, j, t = cfg.dim, cfg.joints, cfg.frames
    stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
    attn = 0
    for n in tokens_per_block(stages, cfg.depth, t):
        attn += 4 * n * j * j * c  # spatial: n sequences of J joints
        attn += 4 * j * n * n * c  # temporal: J sequences of n frames
    if stages and not cfg.seq2frame and cfg.trm == "cross_attention":
        attn += 4 * j * t * stages[-1][1] * c
    return predicted_linear_flops(cfg) + attn + pruning_flops(cfg)


def model_gflops(model: nn.Module, cfg: ModelConfig) -> dict[str, float]:
    """{gflops_linear, gflops_total, gflops_predicted_linear, gflops_predicted_total} per clip of cfg.frames frames."""
    was_training = model.training
    model.eval()
    x = _dummy_input(cfg).to(next(model.parameters()).device)
    try:
        return {
            "gflops_linear": linear_flops(model, x) / 1e9,
            "gflops_total": total_flops(model, x, cfg) / 1e9,
            "gflops_predicted_linear": predicted_linear_flops(cfg) / 1e9,
            "gflops_predicted_total": predicted_total_flops(cfg) / 1e9,
        }
    finally:
        model.train(was_training)
