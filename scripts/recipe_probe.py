"""Single-process training probe: how fast does a model/recipe learn on real shards, per CPU second?

usage: python scripts/recipe_probe.py NAME [config=configs/mixste_small.yaml] [data=SHARDS] [steps=1200] [batch=8]
                                           [lr=2e-3] [seed=0] [every=300] [eval_windows=300] [MODEL_KEY=VALUE ...]

One torch thread, clips drawn uniformly at random from the whole training split (no Ray); the step of
`h2ot bench-train`'s plain loop (the config's loss, flip augmentation and gradient clipping); AdamW with the
config's weight decay; linear warm-up over steps/9 then cosine to 0.
Every `every` steps: MPJPE / P-MPJPE on `eval_windows` evenly spaced test windows (test-time flip) and the
seconds so far. Other KEY=VALUE pairs override model keys (e.g. schedule=[[1,9]] dim=96). This is how the batch
size of the small configs was chosen (docs/RESULTS.md, "How this recipe was found"); one seed per line, so
differences of a few mm are noise.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from h2ot.config import load_config
from h2ot.engine import train_step
from h2ot.models import build_model
from jobs.evaluation import evaluate, load_windows
from jobs.train_loop import TRAIN_COLUMNS, build_lr_scheduler, seed_everything, step_settings
from pipelines.shards import read_split


def main(argv: list[str]) -> int:
    if not argv or "=" in argv[0]:
        print(__doc__)
        return 2
    name, opts = argv[0], dict(a.split("=", 1) for a in argv[1:])
    steps, batch, lr = int(opts.pop("steps", 1200)), int(opts.pop("batch", 8)), float(opts.pop("lr", 2e-3))
    seed, every = int(opts.pop("seed", 0)), int(opts.pop("every", 300))
    data_dir = opts.pop("data", "outputs/h36m_f27_gt_s54")
    eval_windows = int(opts.pop("eval_windows", 300))
    cfg = load_config(opts.pop("config", "configs/mixste_small.yaml"), [f"model.{k}={v}" for k, v in opts.items()])

    torch.set_num_threads(1)
    seed_everything(seed)
    train = read_split(data_dir, "train", TRAIN_COLUMNS)
    test = load_windows(data_dir, "test", eval_windows)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
    schedule = SimpleNamespace(lr_schedule="cosine", epochs=1, steps_per_epoch=steps, warmup_steps=max(1, steps // 9))
    scheduler, _ = build_lr_scheduler(optimizer, schedule)  # the training loop's warm-up + cosine, stepped per step
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    scaler, settings = torch.amp.GradScaler("cpu", enabled=False), step_settings(cfg, torch.device("cpu"))
    start, losses = time.time(), []
    for step in range(1, steps + 1):
        idx = np.sort(rng.choice(len(train["valid"]), batch, replace=False))
        clips = {k: torch.from_numpy(v[idx]).float() for k, v in train.items()}
        losses.append(float(train_step(model, clips, optimizer, scaler, settings, gen)))
        scheduler.step()
        if step % every == 0 or step == steps:
            acc, _ = evaluate(model, test, cfg.model.in_channels, 64, True)
            r = acc.result()
            print(f"{name} step {step} loss {np.mean(losses):.3f} mpjpe {r['mpjpe_mm']:.1f} "
                  f"p_mpjpe {r['p_mpjpe_mm']:.1f} seconds {time.time() - start:.0f}", flush=True)
            losses = []
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
