"""FLOPs per clip, in two conventions (2 x MACs, forward pass, batch 1).

- linear: what the papers report (Linear layers only): counted with forward hooks on every nn.Linear.
- total: torch's FlopCounterMode under the math attention backend (so attention products are seen), plus the
  pruning's own cost (distances and density terms), which the counter does not see, added by hand.
And the analytic predictions from the schedule's kept-token counts and each backbone's CostTerms
(`cost_terms(cfg)` on the model class), so a new backbone states its costs once, beside its code.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from h2ot.config import ModelConfig
from h2ot.models.base import CostTerms
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


def cost_terms(cfg: ModelConfig) -> CostTerms:
    """The backbone's own analytic cost terms (its `cost_terms(cfg)` classmethod)."""
    from h2ot.models import MODEL_REGISTRY

    terms = getattr(MODEL_REGISTRY.get(cfg.backbone), "cost_terms", None)
    if terms is None:
        raise NotImplementedError(f"backbone {cfg.backbone!r} has no cost_terms(cfg): its FLOPs cannot be predicted")
    return terms(cfg)


def _pruning_terms(cfg: ModelConfig) -> tuple[int, int]:
    """(by hand, counted) FLOPs of every TPM stage's scoring (see TokenPruner.scoring_flops)."""
    from h2ot.pruning import TPM_REGISTRY

    stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
    if not stages:
        return 0, 0
    strategy, temporal, tokens = TPM_REGISTRY.get(cfg.tpm), cost_terms(cfg).temporal_attentions, _tokens_per_frame(cfg)
    hand = counted = 0
    current = cfg.frames
    for block, n in stages:
        h, c = strategy.scoring_flops(cfg, current, block, temporal, tokens)
        hand, counted, current = hand + h, counted + c, n
    return hand, counted


def pruning_flops(cfg: ModelConfig) -> int:
    """Hand count of what FlopCounterMode misses in the TPMs' scoring (e.g. DPC-kNN: per stage the frame mean
    T'JC, pairwise distances 3 T'^2 C and the density / delta terms ~4 T'^2; attention: the column sums of the
    recorded attention weights)."""
    return _pruning_terms(cfg)[0]


def total_flops(model: nn.Module, x: torch.Tensor, cfg: ModelConfig) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return int(counter.get_total_flops()) + pruning_flops(cfg)


def _trm_macs(cfg: ModelConfig, stages: list[tuple[int, int]]) -> tuple[int, int]:
    """(Linear, attention-product) MACs of the TRM restoring T frames from the last stage's n, per clip
    (the strategy's own `linear_macs` / `attention_macs` per token of a frame, times the tokens a frame holds)."""
    from h2ot.recovery import TRM_REGISTRY

    if not stages or cfg.seq2frame:
        return 0, 0
    strategy, tokens, n_last = TRM_REGISTRY.get(cfg.trm), _tokens_per_frame(cfg), stages[-1][1]
    return (tokens * strategy.linear_macs(cfg, cfg.frames, n_last),
            tokens * strategy.attention_macs(cfg, cfg.frames, n_last))


def _tokens_per_frame(cfg: ModelConfig) -> int:
    """Tokens a frame is split into: J for the joint-token backbones, 1 for a frame-token one."""
    return cost_terms(cfg).tokens_per_frame or cfg.joints


def predicted_linear_flops(cfg: ModelConfig) -> int:
    """Analytic Linear-layer FLOPs (per clip, 2 x MACs) from the schedule's kept-token counts and the backbone's
    CostTerms: blocks (per joint token they see), embedding (all T frames), TRM, output layers (per output frame:
    T, or the centre frame of an eval-mode seq2frame model)."""
    terms, j, t = cost_terms(cfg), _tokens_per_frame(cfg), cfg.frames
    stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
    macs = sum(n * j * terms.block_linear_macs for n in tokens_per_block(stages, cfg.depth, t))
    macs += t * j * terms.input_linear_macs
    out_frames = 1 if cfg.seq2frame else t
    macs += out_frames * j * terms.output_linear_macs
    macs += _trm_macs(cfg, stages)[0]
    return int(round(2 * macs))


def predicted_total_flops(cfg: ModelConfig) -> int:
    """Analytic total FLOPs: the Linear count plus the attention products (QK^T and AV, 2 x 2 L^2 C per
    sequence) of every attention of every block and of the cross-attention TRM, plus the TPMs' scoring (by hand
    and the matmuls the counter sees)."""
    terms, c, j, t = cost_terms(cfg), cfg.dim, _tokens_per_frame(cfg), cfg.frames
    stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
    attn = 0
    for n in tokens_per_block(stages, cfg.depth, t):
        attn += terms.spatial_attentions * 4 * n * j * j * c  # n sequences of J joints
        attn += terms.temporal_attentions * 4 * j * n * n * c  # J sequences of n frames
    attn += 2 * _trm_macs(cfg, stages)[1]
    return predicted_linear_flops(cfg) + attn + sum(_pruning_terms(cfg))


def model_gflops(model: nn.Module, cfg: ModelConfig) -> dict[str, float]:
    """{gflops_linear, gflops_total, gflops_predicted_linear, gflops_predicted_total} per clip of cfg.frames frames.

    The predictions are NaN for a backbone without `cost_terms` (e.g. the per-frame MLP), whose count is still
    measured."""
    was_training = model.training
    model.eval()
    x = _dummy_input(cfg).to(next(model.parameters()).device)
    try:
        out = {"gflops_linear": linear_flops(model, x) / 1e9, "gflops_total": total_flops(model, x, cfg) / 1e9}
    finally:
        model.train(was_training)
    try:
        out["gflops_predicted_linear"] = predicted_linear_flops(cfg) / 1e9
        out["gflops_predicted_total"] = predicted_total_flops(cfg) / 1e9
    except NotImplementedError:
        out["gflops_predicted_linear"] = out["gflops_predicted_total"] = float("nan")
    return out
