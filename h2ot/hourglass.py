"""The Hierarchical Hourglass Tokenizer wrapped around any backbone's block loop.

A backbone calls `start` on its [B, T, J, C] tokens, `before_block(x, i, state)` before each block i (a TPM
prunes there when the schedule says so) and `finish` after the last block (the TRM restores T frames, or a
seq2frame model keeps the centre frame). Pruning is configured, never forked into model files.

Attention-based pruning: a backbone asks `attention_sink(i, state)` before running block i's temporal attention;
when the next block prunes with a strategy that scores frames by attention, that attention records the
attention each frame receives into `state.context` (see h2ot.layers.ATTENTION_RECEIVED), which the TPM reads.

seq2frame: every TPM keeps the centre frame (must_keep); no TRM. In training mode the model outputs the kept
frames (the targets of the training loss, with their original indices in `frame_indices`); in eval mode only
the centre frame [B, 1, J, C] — see h2ot.targets.select_targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.layers import ATTENTION_RECEIVED
from h2ot.pruning import build_tpm, frame_positions, index_constant, take_frames
from h2ot.recovery import build_trm
from h2ot.schedule import validate_schedule


@dataclass
class HourglassState:
    frames: int
    # [B, T'] original positions of the current tokens; None before the first stage, where they are the frames in
    # order (nothing to build or gather for them: ops that a batch-1 forward pays for; see current_indices)
    frame_indices: torch.Tensor | None = None
    kept_indices: list[torch.Tensor] = field(default_factory=list)
    context: dict = field(default_factory=dict)  # e.g. attention maps for attention-based pruning

    def current_indices(self, x: torch.Tensor) -> torch.Tensor:
        """frame_indices as a tensor [B, T'] for the tokens x [B, T', ...]."""
        if self.frame_indices is not None:
            return self.frame_indices
        b, t = x.shape[:2]
        return frame_positions(t, x.device).expand(b, t)


class Hourglass(nn.Module):
    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.stages = validate_schedule(cfg.schedule, cfg.depth, cfg.frames, cfg.seq2frame)
        self.stage_of_block = {block: i for i, (block, _) in enumerate(self.stages)}
        self.pruner = build_tpm(cfg) if self.stages else None
        # A new zero-initialised temporal position code for the n tokens of each stage.
        self.stage_pos = nn.ParameterList([nn.Parameter(torch.zeros(1, n, 1, dim)) for _, n in self.stages])
        self.recovery = build_trm(cfg, dim) if self.stages and not cfg.seq2frame else None
        self.fixed_stages = self._fixed_stages()

    def _fixed_stages(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
        """Per stage, (the kept positions among the current tokens, their original frame indices) when every
        stage keeps fixed positions (TokenPruner.fixed_positions: the uniform TPM) and no frame must be kept
        (seq2seq); else None. The kept frames are then constants of the schedule: a stage is one index_select
        and the TRM can precompute its weights (TokenRecovery.recover_fixed), ops a batch-1 forward pays for."""
        if self.pruner is None or self.cfg.seq2frame:
            return None
        fixed, original = [], tuple(range(self.cfg.frames))
        for _, n in self.stages:
            local = self.pruner.fixed_positions(len(original), n)
            if local is None:
                return None
            original = tuple(original[p] for p in local)
            fixed.append((tuple(local), original))
        return fixed

    def prunes_before(self, block: int) -> bool:
        return block in self.stage_of_block

    def attention_sink(self, block: int, state: HourglassState) -> dict | None:
        """Where block `block`'s temporal attention records the attention each frame receives: state.context
        when the next block prunes with an attention-scored TPM, else None (plain SDPA)."""
        if self.pruner is not None and self.pruner.uses_attention and self.prunes_before(block + 1):
            return state.context
        return None

    def start(self, x: torch.Tensor) -> HourglassState:
        return HourglassState(frames=x.shape[1])

    def before_block(self, x: torch.Tensor, block: int, state: HourglassState) -> torch.Tensor:
        stage = self.stage_of_block.get(block)
        if stage is None:
            return x
        n = self.stages[stage][1]
        if self.fixed_stages is not None:
            local, original = self.fixed_stages[stage]
            x = x.index_select(1, index_constant(local, x.device))
            state.frame_indices = index_constant(original, x.device).expand(x.shape[0], n)
        else:
            must_keep = state.current_indices(x) == state.frames // 2 if self.cfg.seq2frame else None
            x, state.frame_indices = self.pruner(x, n, state.frame_indices, must_keep, state.context)
        state.context.pop(ATTENTION_RECEIVED, None)  # belongs to the tokens before this stage
        state.kept_indices.append(state.frame_indices)
        return x + self.stage_pos[stage]

    def finish(self, x: torch.Tensor, state: HourglassState) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T', J, C] -> (tokens [B, T_out, J, C], their original frame indices [B, T_out]).

        seq2seq: T_out = T (the TRM restores the pruned frames). seq2frame: the kept frames T_out = T' in
        training mode (their targets make the loss), the centre frame T_out = 1 in eval mode.
        """
        b = x.shape[0]
        if self.cfg.seq2frame and self.training:
            return x, state.current_indices(x)
        if self.cfg.seq2frame:
            centre = (state.current_indices(x) == state.frames // 2).float().argmax(dim=1, keepdim=True)  # [B, 1]
            x = take_frames(x, centre)
            return x, torch.full((b, 1), state.frames // 2, device=x.device, dtype=torch.long)
        if self.recovery is not None and self.fixed_stages is not None:
            x = self.recovery.recover_fixed(x, self.fixed_stages[-1][1], state.frames)
        elif self.recovery is not None:
            x = self.recovery(x, state.frame_indices, state.frames)
        return x, frame_positions(state.frames, x.device).expand(b, state.frames)
