"""One training step and one evaluation batch: what every loop runs (the Ray Train loop, `h2ot bench-train`,
`h2ot eval`, scripts).

A batch is a dict of tensors in the shard schema: pose_2d [B, T, J, 2], conf_2d [B, T, J], pose_3d [B, T, J, 3]
metres, valid [B, T]. Both functions move the batch to the model's device themselves, and `eval_batch` hands its
results back on the CPU, so a caller never mixes devices. The targets of a model's output frames come from
`h2ot.targets.select_targets` (all frames, or the centre / kept frames of a seq2frame model).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from h2ot.losses import training_loss
from h2ot.models.base import predict
from h2ot.skeleton import flip_pose
from h2ot.targets import select_targets


class ShardMismatch(ValueError):
    """The shards do not fit the model (window length, input channels)."""


@dataclass(frozen=True)
class StepSettings:
    """What a training step needs besides the model and the batch (from the train config's model, optim, loss)."""

    in_channels: int = 2
    tc_weight: float = 0.5
    velocity_weight: float = 2.0
    grad_clip: float = 1.0  # <= 0: no clipping
    flip_augment: bool = True
    amp: bool = False  # float16 autocast; only where the model's device supports it (CUDA)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameter; DDP wrappers included. A model without torch parameters
    (an ONNX Runtime session, a precision wrapper) takes its input on the CPU."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def batch_input(pose_2d: torch.Tensor, conf_2d: torch.Tensor | None, in_channels: int) -> torch.Tensor:
    """Shard columns -> the model's input: [B, T, J, 2] (+ confidence [B, T, J]) -> [B, T, J, in_channels]."""
    if in_channels == 2:
        return pose_2d
    if in_channels == 3:
        if conf_2d is None:
            raise ShardMismatch("the model takes (x, y, confidence) input but no conf_2d was given")
        return torch.cat([pose_2d, conf_2d.unsqueeze(-1).to(pose_2d.dtype)], dim=-1)
    raise ShardMismatch(f"model.in_channels must be 2 or 3, got {in_channels}")


def flip_half(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a random half of the clips (input x [B, T, J, C] and target y [B, T, J, 3] together).

    gen is a CPU generator (so the draw is the same on every device); the mask follows x to its device."""
    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, flip_pose(x), x), torch.where(mask, flip_pose(y), y)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_loss(model: nn.Module, batch: dict[str, torch.Tensor], settings: StepSettings,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """The forward half of a training step: flip augmentation, the model (autocast with settings.amp), the
    weighted loss in float32 on the output frames' targets. -> scalar loss (with its graph)."""
    device = model_device(model)
    batch = _to(batch, device)
    x, y = batch_input(batch["pose_2d"], batch.get("conf_2d"), settings.in_channels), batch["pose_3d"]
    if settings.flip_augment and gen is not None:
        x, y = flip_half(x, y, gen)
    amp = torch.autocast(device_type=device.type, dtype=torch.float16) if settings.amp else contextlib.nullcontext()
    with amp:
        out = model(x)
    target, valid = select_targets(out, y, batch["valid"])
    return training_loss(out.pose_3d.float(), target, valid, settings.tc_weight, settings.velocity_weight)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, settings: StepSettings, gen: torch.Generator | None = None
               ) -> torch.Tensor:
    """One optimizer step on `batch` (`step_loss`, scaled backward, gradient clipping). Returns the loss, detached
    and on the model's device (reading it forces a device sync, so callers add it up and read it per epoch)."""
    loss = step_loss(model, batch, settings, gen)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if settings.grad_clip and settings.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@torch.no_grad()
def eval_batch(model: nn.Module, batch: dict[str, torch.Tensor], in_channels: int, test_flip: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions of a model in eval mode on `batch`, with test-time flip averaging.

    -> (pred [B, T_out, J, 3] float32, target [B, T_out, J, 3], valid [B, T_out] bool, frame_indices [B, T_out]),
    all on the CPU, aligned frame by frame (seq2frame models: the centre frame).
    """
    batch = _to(batch, model_device(model))
    out = predict(model, batch_input(batch["pose_2d"], batch.get("conf_2d"), in_channels), test_flip=test_flip)
    target, valid = select_targets(out, batch["pose_3d"], batch["valid"])
    return out.pose_3d.float().cpu(), target.float().cpu(), valid.cpu(), out.frame_indices.cpu()
