"""The learning-rate schedules a run can name (`optim.lr_schedule`): exponential per epoch, or warm-up + cosine
per step. `build_lr_scheduler(optimizer, optim)` -> (scheduler, per_step)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from h2ot.config import ConfigError
from h2ot.registry import Registry
from jobs.settings import OptimConfig

LrScheduler = torch.optim.lr_scheduler.LRScheduler
# optim.lr_schedule name -> (optimizer, optim config) -> (scheduler, per_step)
LR_SCHEDULES: Registry[Callable[[torch.optim.Optimizer, OptimConfig], tuple[LrScheduler, bool]]] = Registry(
    "lr schedule", key="optim.lr_schedule")


@LR_SCHEDULES.register("exponential")
def exponential_schedule(optimizer: torch.optim.Optimizer, ocfg: OptimConfig) -> tuple[LrScheduler, bool]:
    """x optim.lr_decay once per epoch."""
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ocfg.lr_decay), False


@LR_SCHEDULES.register("cosine")
def cosine_schedule(optimizer: torch.optim.Optimizer, ocfg: OptimConfig) -> tuple[LrScheduler, bool]:
    """Linear warm-up over optim.warmup_steps, then half a cosine from lr to 0 at the run's last step
    (epochs x steps_per_epoch, so the cap must be set); steps once per training step."""
    if not ocfg.steps_per_epoch:
        raise ConfigError("optim.lr_schedule=cosine needs optim.steps_per_epoch (the run's length in steps)")
    total, warmup = ocfg.epochs * ocfg.steps_per_epoch, max(0, ocfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


def build_lr_scheduler(optimizer: torch.optim.Optimizer, ocfg: OptimConfig) -> tuple[LrScheduler, bool]:
    """(scheduler, per_step) of optim.lr_schedule (see LR_SCHEDULES)."""
    return LR_SCHEDULES.get(ocfg.lr_schedule)(optimizer, ocfg)
