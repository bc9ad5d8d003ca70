"""`h2ot bench-train --json`: samples/s of the Ray Train loop (1 and 2 workers) beside a plain PyTorch loop.

Same model, batch (per worker) and shards; fixed threads for fairness: the plain loop uses 2 intra-op threads,
each Ray worker 1. The plain loop holds the training windows in memory (numpy) and draws shuffled batches;
the Ray loop streams them with Ray Data (`iter_torch_batches`). Each Ray run trains `--epochs` epochs of
`--steps` steps and the last (warm) epoch is measured: clips/s over its training time, and the fraction of that
time spent waiting for the next batch (`data_wait_frac`). Targets (printed as ratios, not asserted):
Ray 2 workers >= 0.9x the plain loop's samples/s; data wait < 5 % of step time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.ray_session import connect
from jobs._common import add_output_flags, friendly_errors, require_shards, setup_logging
from jobs.settings import TrainConfig, load_train_config, train_config_from_dict

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mixste_small.yaml"


def plain_loop(cfg: TrainConfig, data_dir: str | Path, steps: int, warmup: int, threads: int = 2) -> dict[str, float]:
    """Single-process PyTorch: the training step of the Ray loop (h2ot.engine.train_step: flip augmentation,
    weighted loss on the output frames' targets, clipping) with AdamW, `threads` intra-op threads."""
    import numpy as np
    import torch

    from h2ot.engine import train_step
    from h2ot.models import build_model
    from jobs.train_loop import TRAIN_COLUMNS, seed_everything, step_settings
    from pipelines.shards import read_split

    torch.set_num_threads(threads)
    seed_everything(cfg.optim.seed)
    data = read_split(data_dir, "train", TRAIN_COLUMNS)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    settings = step_settings(cfg, torch.device("cpu"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data["valid"]))
    bs = cfg.optim.batch_size
    wait = busy = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        idx = np.sort(order[(step * bs) % (len(order) - bs):][:bs])
        batch = {k: torch.from_numpy(np.ascontiguousarray(data[k][idx])).float() for k in TRAIN_COLUMNS}
        t1 = time.perf_counter()
        train_step(model, batch, opt, scaler, settings, gen)
        t2 = time.perf_counter()
        if step >= warmup:
            wait, busy = wait + t1 - t0, busy + t2 - t1
    return {"samples_per_s": steps * bs / (wait + busy), "data_wait_frac": wait / (wait + busy), "threads": threads,
            "steps": steps}


def ray_loop(cfg: TrainConfig, data_dir: str | Path, workers: int, steps: int, epochs: int) -> dict[str, float]:
    """The real Ray Train loop (jobs.train_loop) with `workers` workers of 1 thread; last epoch measured."""
    from h2ot.config import apply_overrides, to_dict
    from jobs.train import build_trainer

    overrides = [f"scaling.num_workers={workers}", "scaling.torch_threads=1", f"optim.epochs={epochs}",
                 f"optim.steps_per_epoch={steps}", "optim.eval_max_windows=8", "run.max_failures=0"]
    cfg = train_config_from_dict(apply_overrides(to_dict(cfg), overrides))
    with tempfile.TemporaryDirectory(prefix="h2ot-bench-train-") as tmp:
        result = build_trainer(cfg, data_dir, tmp, name=f"bench-{workers}w", mlflow=False).fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run with {workers} workers failed: {result.error}")
    m = result.metrics
    return {"samples_per_s": m["clips_per_s"], "data_wait_frac": m["data_wait_frac"], "workers": workers,
            "threads_per_worker": 1, "steps_per_worker": steps}


def run_bench(config: str | Path, data_dir: str | Path, steps: int, epochs: int, warmup: int,
              workers: list[int]) -> dict[str, Any]:
    import ray

    cfg = load_train_config(config)
    out: dict[str, Any] = {"config": str(config), "data": str(data_dir), "batch_size_per_worker": cfg.optim.batch_size,
                           "model": {"backbone": cfg.model.backbone, "dim": cfg.model.dim, "depth": cfg.model.depth,
                                     "frames": cfg.model.frames, "schedule": cfg.model.schedule}}
    out["plain"] = plain_loop(cfg, data_dir, steps, warmup)
    log.info("plain loop: %s", out["plain"])
    connect("local", num_cpus=2, dashboard=False, env_vars={"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})
    for w in workers:
        out[f"ray_{w}w"] = ray_loop(cfg, data_dir, w, steps, epochs)
        log.info("ray %d workers: %s", w, out[f"ray_{w}w"])
    ray.shutdown()
    plain = out["plain"]["samples_per_s"]
    out["ratios"] = {f"ray_{w}w_vs_plain": out[f"ray_{w}w"]["samples_per_s"] / plain for w in workers}
    out["targets"] = {"ray_2w_vs_plain_min": 0.9, "data_wait_frac_max": 0.05}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="h2ot bench-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="train config (model, batch): default mixste_small")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--steps", type=int, default=30, help="measured steps (per worker for Ray)")
    p.add_argument("--epochs", type=int, default=2, help="Ray epochs of --steps steps; the last one is measured")
    p.add_argument("--warmup", type=int, default=5, help="plain loop: unmeasured first steps")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    add_output_flags(p)
    return p.parse_args(argv)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    require_shards(args.data)
    out = run_bench(args.config, args.data, args.steps, args.epochs, args.warmup, args.workers)
    if args.json:
        print(json.dumps(out))
    else:
        for key in ["plain"] + [f"ray_{w}w" for w in args.workers]:
            r = out[key]
            print(f"{key:8s} {r['samples_per_s']:8.1f} samples/s  data wait {100 * r['data_wait_frac']:.1f} %")
        print(json.dumps(out["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
