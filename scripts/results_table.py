"""Markdown tables of finished runs, for docs/RESULTS.md: per-epoch validation, final evaluation, seed summary.

usage: python scripts/results_table.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is an `--out` folder of `h2ot train` (its mlflow_run.json names the MLflow run whose per-epoch metrics
are read). The final-evaluation table reads RUN_DIR.eval.json beside it, written by
`h2ot eval --checkpoint RUN_DIR/model.pt --data SHARDS --json > RUN_DIR.eval.json`; runs without one are left out.
Runs named <config>_s<seed> are also summarised per config as mean +- sd over their seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

KEYS = ["val/mpjpe_mm", "val/p_mpjpe_mm", "val/mpjve_mm", "train/loss", "train_time_s", "clips_per_s", "step",
        "data_wait_frac", "gflops"]


def history(run_dir: Path) -> dict[int, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    info_path = run_dir / "mlflow_run.json"
    if not info_path.is_file():
        raise SystemExit(f"{info_path} is missing: RUN_DIR must be the --out folder of a finished `h2ot train`")
    info = json.loads(info_path.read_text())
    client = MlflowClient(info["uri"])
    rows: dict[int, dict[str, float]] = {}
    for key in KEYS:
        for m in client.get_metric_history(info["run_id"], key):
            rows.setdefault(m.step, {})[key] = m.value
    return dict(sorted(rows.items()))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="--out folder of `h2ot train`")
    args = p.parse_args(argv)
    runs = {Path(a).name: (history(Path(a)), Path(a.rstrip("/") + ".eval.json")) for a in args.run_dirs}
    print("| run | epoch | step | train s | clips/s | data wait | MPJPE | P-MPJPE | MPJVE | train loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (hist, _) in runs.items():
        for epoch, r in hist.items():
            print(f"| {name} | {epoch} | {r['step']:.0f} | {r['train_time_s']:.0f} | {r['clips_per_s']:.1f} | "
                  f"{100 * r['data_wait_frac']:.1f} % | {r['val/mpjpe_mm']:.1f} | {r['val/p_mpjpe_mm']:.1f} | "
                  f"{r['val/mpjve_mm']:.2f} | {r['train/loss']:.3f} |")
    print()
    print("| run (model.pt) | GFLOPs linear | GFLOPs total | MPJPE | P-MPJPE | MPJVE | frames | eval clips/s | epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, ev) in runs.items():
        if not ev.is_file() or not ev.read_text().strip():
            continue
        e = json.loads(ev.read_text())
        print(f"| {name} | {e['gflops']:.4f} | {e['gflops_total']:.4f} | {e['mpjpe_mm']:.1f} | {e['p_mpjpe_mm']:.1f} | "
              f"{e['mpjve_mm']:.2f} | {e['frames']} | {e['clips_per_s']:.0f} | {e['epoch']} |")
    print_seed_summary(runs)
    return 0


def mean_sd(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_seed_summary(runs: dict[str, tuple[dict[int, dict[str, float]], Path]]) -> None:
    """Per config (run name without its _s<seed>): eval metrics and training time as mean +- sd over seeds."""
    groups: dict[str, list[tuple[dict[int, dict[str, float]], dict]]] = {}
    for name, (hist, ev) in runs.items():
        m = re.fullmatch(r"(.+)_s\d+", name)
        if m and ev.is_file() and ev.read_text().strip():
            groups.setdefault(m[1], []).append((hist, json.loads(ev.read_text())))
    print()
    print("| config | seeds | steps | MPJPE | P-MPJPE | MPJVE | train s (rank 0) |")
    print("|---|---|---|---|---|---|---|")
    for config, items in groups.items():
        last = [hist[max(hist)] for hist, _ in items]
        cols = [mean_sd([e[k] for _, e in items], 2 if k == "mpjve_mm" else 1)
                for k in ("mpjpe_mm", "p_mpjpe_mm", "mpjve_mm")]
        print(f"| {config} | {len(items)} | {last[0]['step']:.0f} | {' | '.join(cols)} | "
              f"{mean_sd([r['train_time_s'] for r in last], 0)} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
