"""Print the docs/RESULTS.md tables from finished runs: per-epoch MLflow histories + `h2ot eval` JSON files.

usage: python scripts/results_table.py RUN_DIR [RUN_DIR ...]   (each RUN_DIR of `h2ot train`, with RUN_DIR.eval.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ["val/mpjpe_mm", "val/p_mpjpe_mm", "val/mpjve_mm", "train/loss", "train_time_s", "clips_per_s", "step",
        "data_wait_frac", "gflops"]


def history(run_dir: Path) -> dict[int, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    rows: dict[int, dict[str, float]] = {}
    for key in KEYS:
        for m in client.get_metric_history(info["run_id"], key):
            rows.setdefault(m.step, {})[key] = m.value
    return dict(sorted(rows.items()))


def main(argv: list[str]) -> int:
    runs = {Path(a).name: (history(Path(a)), Path(a + ".eval.json")) for a in argv}
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
