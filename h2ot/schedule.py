"""The hierarchical pruning schedule: a list of (block, tokens) stages, validated, and its analytic cost.

Blocks are counted from 0; stage (b, n) keeps n frames before block b. HoT (CVPR'24) on MixSTE is
[(3, 81)]; several stages with fewer and fewer tokens make H2OT's hourglass.
"""

from __future__ import annotations

from collections.abc import Sequence


def validate_schedule(
    stages: Sequence[Sequence[int]], depth: int, frames: int, seq2frame: bool = False
) -> list[tuple[int, int]]:
    """Check a schedule; raise ValueError naming the field (`model.schedule[i]...`) when it is wrong.

    seq2frame: the TPMs always keep the centre frame (frames // 2), so any stage keeping >= 1 token has room
    for it; the frame count must be odd so that the window has one centre.
    """
    if seq2frame and frames % 2 == 0:
        # The output frame is the centre of the window; an even window has two and the data pipeline centres
        # windows on one frame (frames // 2 of an odd count).
        raise ValueError(f"model.frames: a seq2frame model needs an odd frame count (a centre frame), got {frames}")
    out: list[tuple[int, int]] = []
    prev_block, prev_tokens = -1, frames
    for i, stage in enumerate(stages):
        where = f"model.schedule[{i}]"
        if len(stage) != 2:
            raise ValueError(f"{where}: a stage is [block, tokens], got {list(stage)}")
        block, tokens = (int(v) for v in stage)
        if not 0 <= block < depth:
            raise ValueError(f"{where}: block {block} is out of range for depth {depth} (0..{depth - 1})")
        if block <= prev_block:
            raise ValueError(f"{where}: blocks must strictly increase, got {block} after {prev_block}")
        if tokens < 1:
            raise ValueError(f"{where}: tokens must be >= 1, got {tokens}")
        if tokens > frames:
            raise ValueError(f"{where}: tokens {tokens} exceed the {frames} frames of the model")
        if tokens >= prev_tokens:
            raise ValueError(
                f"{where}: tokens must strictly decrease, got {tokens} after {prev_tokens}"
                + (" (the frame count)" if i == 0 else "")
            )
        out.append((block, tokens))
        prev_block, prev_tokens = block, tokens
    return out


def tokens_per_block(stages: Sequence[tuple[int, int]], depth: int, frames: int) -> list[int]:
    """How many frame tokens each of the `depth` blocks sees under the schedule."""
    counts, current = [], frames
    pending = dict(stages)
    for block in range(depth):
        current = pending.get(block, current)
        counts.append(current)
    return counts
