"""Single-process training probe: how fast does a model and recipe learn on real shards, per CPU second?

usage: python scripts/recipe_probe.py --data SHARDS --config CONFIG.yaml [--name NAME] [--steps 1200] [--batch 8]
                                      [--lr 2e-3] [--seed 0] [--every 300] [--eval-windows 300] [--threads 1]
                                      [--set model.KEY=VALUE ...]

example: python scripts/recipe_probe.py --data outputs/h36m_f27_gt_s54 --config configs/frameformer_small.yaml \
             --steps 1200 --every 300 --set model.schedule=[]

No Ray: clips drawn uniformly at random from the whole training split; the step of `h2ot bench-train`'s plain
loop (the config's loss, flip augmentation, gradient clipping); AdamW with the config's weight decay; linear
warm-up over steps/9, then cosine to 0. Every `--every` steps it prints the mean training loss, MPJPE and
P-MPJPE (mm) on `--eval-windows` evenly spaced test windows with test-time flip, and the seconds so far.
Cheap enough to run two side by side on one core each; one seed per line, so differences of a few mm are noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from h2ot.config import ConfigError
from h2ot.engine import train_step
from h2ot.models import build_model
from jobs.evaluation import evaluate, load_windows
from jobs.lr_schedules import build_lr_scheduler
from jobs.settings import load_train_config
from jobs.train_loop import TRAIN_COLUMNS, seed_everything, step_settings
from pipelines.shards import read_split


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="shard folder of `h2ot preprocess`")
    p.add_argument("--config", required=True, help="train config YAML (its model, loss and weight decay)")
    p.add_argument("--name", default="probe", help="label printed on every line")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=300, help="evaluate every N steps (and at the last)")
    p.add_argument("--eval-windows", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.every < 1:
        p.error("--steps, --batch and --every must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.set)
    except (ConfigError, OSError) as e:
        print(f"recipe_probe: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train = read_split(args.data, "train", TRAIN_COLUMNS)
    test = load_windows(args.data, "test", args.eval_windows)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=cfg.optim.weight_decay)
    schedule = SimpleNamespace(lr_schedule="cosine", epochs=1, steps_per_epoch=args.steps,
                               warmup_steps=max(1, args.steps // 9))
    scheduler, _ = build_lr_scheduler(optimizer, schedule)  # the training loop's warm-up + cosine, per step
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    scaler, settings = torch.amp.GradScaler("cpu", enabled=False), step_settings(cfg, torch.device("cpu"))
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        idx = np.sort(rng.choice(len(train["valid"]), args.batch, replace=False))
        clips = {k: torch.from_numpy(v[idx]).float() for k, v in train.items()}
        losses.append(float(train_step(model, clips, optimizer, scaler, settings, gen)))
        scheduler.step()
        if step % args.every == 0 or step == args.steps:
            acc, _ = evaluate(model, test, cfg.model.in_channels, 64, True)
            r = acc.result()
            print(f"{args.name} step {step} loss {np.mean(losses):.3f} mpjpe {r['mpjpe_mm']:.1f} "
                  f"p_mpjpe {r['p_mpjpe_mm']:.1f} seconds {time.time() - start:.0f}", flush=True)
            losses = []
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
