"""The pure side of `h2ot tune`: its config (`TuneConfig`: the search space and the tune settings around a base
train config; the `tune` config kind), search-space checks, a sampler that only draws valid schedules, the Pareto
front of (GFLOPs, MPJPE) and the search summary. No Ray, no MLflow: unit-testable in milliseconds.

A trial is a plain dict {"schedule": [[block, tokens], ...], "tpm": str, "trm": str, "lr": float}; a result row
adds at least {"trial_id", "gflops", "mpjpe_mm"} (lower is better for both).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h2ot.config import ConfigError, ModelConfig, load_config, register_config_kind
from h2ot.registry import Registry
from h2ot.schedule import validate_schedule
from jobs.settings import TrainConfig, load_train_config

# Trial schedulers `tune.scheduler` may name (jobs/tune.py builds them): name -> what it does.
SCHEDULERS: Registry[str] = Registry("scheduler", key="tune.scheduler")
SCHEDULERS.register("asha", "ASHA: stops the worst trials at each rung")
SCHEDULERS.register("none", "FIFO: every trial runs all epochs")
MAX_DRAWS_PER_TRIAL = 200  # attempts to draw an unseen trial before the space counts as exhausted


@dataclass
class SearchSpace:
    """What `h2ot tune` draws each trial from (sample_trials); every drawn schedule is valid.

    A schedule of k stages takes k distinct `blocks` (ascending) and k distinct `tokens` (descending), so the
    tokens decrease and the blocks increase by construction. `include` schedules (e.g. the full model `[]` and
    HoT's one stage) are always trials, first; `lr` is a log-uniform range [low, high] (or one value).
    """

    stages: list[int] = field(default_factory=lambda: [1, 2, 3])  # stage counts to draw from (0 = full model)
    tokens: list[int] = field(default_factory=list)  # kept-token counts a stage may use, each < model.frames
    blocks: list[int] | None = None  # blocks a stage may start at; None: 1 .. depth-1 (pruning at 0 hurts)
    tpm: list[str] = field(default_factory=lambda: ["dpc_knn"])  # h2ot.pruning.TPM_REGISTRY names
    trm: list[str] = field(default_factory=lambda: ["cross_attention"])  # h2ot.recovery.TRM_REGISTRY names
    lr: list[float] = field(default_factory=list)  # [low, high] log-uniform, [value], or [] (the base lr)
    include: list[list[list[int]]] = field(default_factory=list)  # schedules tried in every search


@dataclass
class TuneSettings:
    num_samples: int = 16  # trials, `include` ones counted
    seed: int = 0  # of the sampler (the same seed draws the same trials)
    metric: str = "val/mpjpe_mm"
    mode: str = "min"
    scheduler: str = "asha"  # "asha" or "none" (FIFO: every trial runs all epochs)
    grace_period: int = 1  # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold
    workers_per_trial: int | None = None  # Ray Train workers per trial; None: the base config's, capped to the cluster
    reserve_cpus: float = 1.0  # CPUs left free for Ray Data's readers (else they wait behind the trials)
    hot_schedule: list[list[int]] = field(default_factory=list)  # the one-stage HoT point marked on the plot
    seeds: list[int] = field(default_factory=list)  # train every drawn trial once per seed (optim.seed); []: base


@dataclass
class TuneConfig:
    """`h2ot tune`: search `space` around the train config `base` (a path relative to this file), each trial
    trained with `base` + `train_overrides` (dotted `key=value`, as `--set`) + its drawn values."""

    kind: str = "tune"
    base: str = ""
    train_overrides: list[str] = field(default_factory=list)
    space: SearchSpace = field(default_factory=SearchSpace)
    tune: TuneSettings = field(default_factory=TuneSettings)
    name: str | None = None  # the search's name (Ray Tune experiment, MLflow parent run); default: from the file
    experiment: str | None = None  # MLflow experiment; None: the base config's run.experiment

    def base_config(self, overrides: list[str] | None = None) -> TrainConfig:
        """The base TrainConfig with `train_overrides` (+ `overrides`) applied."""
        if not self.base:
            raise ConfigError("base: a tune config names the train config it searches around (base: mixste.yaml)")
        return load_train_config(self.base, [*self.train_overrides, *(overrides or [])])

    def model_config(self) -> ModelConfig:
        return self.base_config().model

    def resolve_paths(self, folder: Path) -> None:
        """`base` is relative to the tune config's folder (h2ot.config.load_config calls this)."""
        if self.base and not Path(self.base).is_absolute():
            self.base = str((folder / self.base).resolve())


register_config_kind("tune", TuneConfig)


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> TuneConfig:
    """A tune YAML file (+ dotted `--set` overrides) -> TuneConfig, its `base` resolved to an absolute path."""
    return load_config(path, overrides, kind="tune")


def default_blocks(depth: int) -> list[int]:
    """Blocks a stage may start at when the space names none: 1 .. depth-1 (HoT users: pruning at 0 hurts)."""
    return list(range(1, depth))


def validate_space(space: SearchSpace, model: ModelConfig, settings: TuneSettings | None = None) -> None:
    """Reject a space that could draw an invalid trial; the ConfigError names the field (`space.tokens[2]`)."""
    from h2ot.pruning import TPM_REGISTRY
    from h2ot.recovery import TRM_REGISTRY

    frames, depth = model.frames, model.depth
    blocks = default_blocks(depth) if space.blocks is None else space.blocks
    for i, n in enumerate(space.tokens):
        if not 1 <= n < frames:
            raise ConfigError(f"space.tokens[{i}]: {n} kept tokens; a stage keeps 1 .. {frames - 1} "
                              f"of the model's {frames} frames")
    if len(set(space.tokens)) != len(space.tokens):
        raise ConfigError(f"space.tokens: repeated values in {space.tokens}")
    for i, b in enumerate(blocks):
        if not 0 <= b < depth:
            raise ConfigError(f"space.blocks[{i}]: block {b} is out of range for depth {depth} (0..{depth - 1})")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"space.blocks: repeated values in {blocks}")
    if not space.stages:
        raise ConfigError("space.stages: empty; give the stage counts to draw from, e.g. [1, 2, 3]")
    for i, k in enumerate(space.stages):
        if k < 0:
            raise ConfigError(f"space.stages[{i}]: {k} stages; must be >= 0")
        if k > len(blocks):
            raise ConfigError(f"space.stages[{i}]: {k} stages need {k} distinct blocks, space.blocks has "
                              f"{len(blocks)} ({blocks})")
        if k > len(space.tokens):
            raise ConfigError(f"space.stages[{i}]: {k} stages need {k} distinct token counts, space.tokens has "
                              f"{len(space.tokens)} ({space.tokens})")
    if model.seq2frame and frames % 2 == 0:
        raise ConfigError(f"model.frames: a seq2frame model needs an odd frame count, got {frames}")
    for field_name, names, registry in (("tpm", space.tpm, TPM_REGISTRY), ("trm", space.trm, TRM_REGISTRY)):
        if not names:
            raise ConfigError(f"space.{field_name}: empty; name at least one of {registry.names()}")
        for i, name in enumerate(names):
            registry.get(name, key=f"space.{field_name}[{i}]")
    if len(space.lr) > 2 or any(not (v > 0 and math.isfinite(v)) for v in space.lr):
        raise ConfigError(f"space.lr: expected [] (the base lr), [value] or [low, high] with positive values, "
                          f"got {space.lr}")
    if len(space.lr) == 2 and space.lr[0] > space.lr[1]:
        raise ConfigError(f"space.lr: low {space.lr[0]} is above high {space.lr[1]}")
    for i, schedule in enumerate(space.include):
        try:
            validate_schedule(schedule, depth, frames, model.seq2frame)
        except ValueError as e:
            raise ConfigError(f"space.include[{i}]: {str(e).replace('model.schedule', 'schedule')}") from None
    if settings is not None:
        _validate_settings(space, settings, model)


def _validate_settings(space: SearchSpace, settings: TuneSettings, model: ModelConfig) -> None:
    if settings.num_samples < 1:
        raise ConfigError(f"tune.num_samples: {settings.num_samples}; must be >= 1")
    if settings.num_samples < len(space.include):
        raise ConfigError(f"tune.num_samples: {settings.num_samples} is fewer than the {len(space.include)} "
                          "space.include schedules")
    SCHEDULERS.get(settings.scheduler)
    if settings.mode not in ("min", "max"):
        raise ConfigError(f"tune.mode: {settings.mode!r}; expected 'min' or 'max'")
    if settings.grace_period < 1 or settings.reduction_factor < 2:
        raise ConfigError("tune.grace_period must be >= 1 and tune.reduction_factor >= 2, got "
                          f"{settings.grace_period} and {settings.reduction_factor}")
    if settings.max_concurrent_trials is not None and settings.max_concurrent_trials < 1:
        raise ConfigError(f"tune.max_concurrent_trials: {settings.max_concurrent_trials}; must be >= 1 or null")
    if settings.workers_per_trial is not None and settings.workers_per_trial < 1:
        raise ConfigError(f"tune.workers_per_trial: {settings.workers_per_trial}; must be >= 1 or null")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise ConfigError(f"tune.seeds: repeated values in {settings.seeds}")
    if settings.hot_schedule:
        try:
            validate_schedule(settings.hot_schedule, model.depth, model.frames, model.seq2frame)
        except ValueError as e:
            raise ConfigError(f"tune.hot_schedule: {str(e).replace('model.schedule', 'schedule')}") from None


def _draw_lr(space: SearchSpace, base_lr: float, rng: random.Random) -> float:
    if not space.lr:
        return base_lr
    if len(space.lr) == 1:
        return float(space.lr[0])
    low, high = math.log(space.lr[0]), math.log(space.lr[1])
    return float(f"{math.exp(rng.uniform(low, high)):.3g}")


def draw_schedule(space: SearchSpace, depth: int, rng: random.Random) -> list[list[int]]:
    """One valid schedule: k stages at k distinct ascending blocks, keeping k distinct descending token counts."""
    k = rng.choice(space.stages)
    if k == 0:
        return []
    blocks = sorted(rng.sample(default_blocks(depth) if space.blocks is None else list(space.blocks), k))
    tokens = sorted(rng.sample(list(space.tokens), k), reverse=True)
    return [[b, n] for b, n in zip(blocks, tokens, strict=True)]


def sample_trials(space: SearchSpace, model: ModelConfig, settings: TuneSettings,
                  base_lr: float) -> list[dict[str, Any]]:
    """`settings.num_samples` distinct valid trials, the `include` schedules first, seeded by `settings.seed`.

    The include schedules get the first TPM/TRM of the space and the base lr (or the middle of the lr range), so
    the anchors are trained as the paper would. Raises ConfigError when the space holds too few distinct trials.
    """
    validate_space(space, model, settings)
    rng = random.Random(settings.seed)
    anchor_lr = base_lr if not space.lr else float(f"{math.sqrt(space.lr[0] * space.lr[-1]):.3g}")
    trials: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(trial: dict[str, Any]) -> bool:
        key = repr((trial["schedule"], trial["tpm"], trial["trm"], trial["lr"]))
        if key in seen:
            return False
        seen.add(key)
        validate_schedule(trial["schedule"], model.depth, model.frames, model.seq2frame)  # by construction
        trials.append(trial)
        return True

    for schedule in space.include:
        add({"schedule": [list(map(int, s)) for s in schedule], "tpm": space.tpm[0], "trm": space.trm[0],
             "lr": anchor_lr})
    draws = 0
    while len(trials) < settings.num_samples:
        draws += 1
        if draws > MAX_DRAWS_PER_TRIAL * settings.num_samples:
            raise ConfigError(f"tune.num_samples: the space holds fewer than {settings.num_samples} distinct trials "
                              f"(drew {len(trials)}); widen space.tokens/blocks/stages or lower num_samples")
        add({"schedule": draw_schedule(space, model.depth, rng), "tpm": rng.choice(space.tpm),
             "trm": rng.choice(space.trm), "lr": _draw_lr(space, base_lr, rng)})
    if settings.seeds:  # the same trial once per training seed (re-checking a winner)
        trials = [{**t, "seed": int(s)} for t in trials for s in settings.seeds]
    return trials


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the same trial trained with different seeds -> mean/std MPJPE per trial, best mean first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _finite(r.get("mpjpe_mm")):
            key = repr(([list(s) for s in r["schedule"]], r["tpm"], r["trm"], r["lr"]))
            groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        values = [float(r["mpjpe_mm"]) for r in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        first = members[0]
        out.append({"schedule": first["schedule"], "tpm": first["tpm"], "trm": first["trm"], "lr": first["lr"],
                    "gflops": first.get("gflops"), "n": len(values), "mpjpe_mm_mean": mean, "mpjpe_mm_std": std,
                    "mpjpe_mm": values, "seeds": [r.get("seed") for r in members]})
    return sorted(out, key=lambda g: g["mpjpe_mm_mean"])


# --------------------------------------------------------------------------------------------- results
def pareto_front(rows: Sequence[dict[str, Any]], x: str = "gflops", y: str = "mpjpe_mm") -> list[dict[str, Any]]:
    """The rows no other row dominates (lower-or-equal x and y, one strictly lower), sorted by x.

    Rows with a missing or non-finite x or y are ignored; of exact duplicates in (x, y) the first is kept.
    """
    valid = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    ordered = sorted(valid, key=lambda r: (float(r[x]), float(r[y])))
    front: list[dict[str, Any]] = []
    best_y = math.inf
    for r in ordered:
        if float(r[y]) < best_y:
            front.append(r)
            best_y = float(r[y])
    return front


def cheapest_within(rows: Sequence[dict[str, Any]], tolerance: float = 0.01, x: str = "gflops",
                    y: str = "mpjpe_mm") -> dict[str, Any] | None:
    """The lowest-x row whose y is within `tolerance` (relative) of the best y; ties go to the lower y."""
    valid = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    if not valid:
        return None
    best = min(float(r[y]) for r in valid)
    within = [r for r in valid if float(r[y]) <= best * (1 + tolerance)]
    return min(within, key=lambda r: (float(r[x]), float(r[y])))


def beats_reference(rows: Sequence[dict[str, Any]], reference: dict[str, Any], x: str = "gflops",
                    y: str = "mpjpe_mm") -> list[dict[str, Any]]:
    """Hierarchical rows (>= 2 stages) with x <= the reference's and y strictly below it, best y first."""
    out = [r for r in rows if len(r.get("schedule") or []) >= 2 and _finite(r.get(x)) and _finite(r.get(y))
           and float(r[x]) <= float(reference[x]) and float(r[y]) < float(reference[y])]
    return sorted(out, key=lambda r: float(r[y]))


def summarize(rows: Sequence[dict[str, Any]], hot_schedule: Sequence[Sequence[int]] | None = None,
              tolerance: float = 0.01) -> dict[str, Any]:
    """The search's outcome over the trials that ran every epoch (`complete`): Pareto rows, the cheapest within
    `tolerance` of the best MPJPE, the full model and HoT rows, and the hierarchical rows that beat HoT."""
    complete = [r for r in rows if r.get("complete", True)]
    front = pareto_front(complete)
    hot = find_schedule(complete, hot_schedule) if hot_schedule else None
    full = find_schedule(complete, [])
    return {
        "trials": len(rows),
        "complete": len(complete),
        "pareto": [r["trial_id"] for r in front],
        "best": min(complete, key=lambda r: float(r["mpjpe_mm"]))["trial_id"] if front else None,
        "cheapest_within_1pct": (cheapest_within(complete, tolerance) or {}).get("trial_id"),
        "tolerance": tolerance,
        "full": full["trial_id"] if full else None,
        "hot": hot["trial_id"] if hot else None,
        "beats_hot": [r["trial_id"] for r in beats_reference(complete, hot)] if hot else [],
    }


def find_schedule(rows: Sequence[dict[str, Any]], schedule: Sequence[Sequence[int]]) -> dict[str, Any] | None:
    """The best-MPJPE row with exactly this schedule (None when no row has it)."""
    target = [list(map(int, s)) for s in schedule]
    hits = [r for r in rows if [list(map(int, s)) for s in r.get("schedule") or []] == target
            and _finite(r.get("mpjpe_mm"))]
    return min(hits, key=lambda r: float(r["mpjpe_mm"])) if hits else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
