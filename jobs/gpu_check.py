"""`python -m jobs.gpu_check --out DIR`: the GPU path end to end on one CUDA machine, in about 10 minutes.

1. torch sees a CUDA device (name, memory, torch and CUDA versions);
2. `h2ot preprocess`: synthetic motion in 243-frame windows (no download);
3. `h2ot train` of the paper-size H2OT config (configs/h2ot_mixste.yaml) with AMP on 1 GPU, a few hundred steps;
4. `h2ot eval --device cuda` of the model it wrote;
5. `h2ot bench --device cuda`: full vs HoT vs H2OT, batch 1 and batch 64.
Each step's command, exit status, seconds and JSON result go to DIR/gpu_check.json (DIR defaults to $OUT, where the
device machine collects files), each step's output to DIR/<step>.log. `--dry-run` prints the commands only; the
first failing step ends the check (exit 1) with its log's last lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jobs._common import UserError, friendly_errors

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/h2ot_mixste.yaml"

CUDA_PROBE = (
    "import json, torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; "
    "p = torch.cuda.get_device_properties(0); "
    "print(json.dumps({'device': p.name, 'memory_gib': round(p.total_memory / 2**30, 1), "
    "'torch': torch.__version__, 'cuda': torch.version.cuda, 'devices': torch.cuda.device_count()}))"
)


def plan(work: Path, steps_per_epoch: int = 150, epochs: int = 2, python: str = sys.executable
         ) -> list[tuple[str, list[str]]]:
    """The check's steps as (name, argv), run from the repository root."""
    cli = [python, "-m", "jobs.cli"]
    data, run = work / "synthetic_f243", work / "run"
    train_overrides = [
        "scaling.num_workers=1", "scaling.use_gpu=true", "scaling.cpus_per_worker=4", "scaling.torch_threads=4",
        f"optim.epochs={epochs}", f"optim.steps_per_epoch={steps_per_epoch}", "optim.amp=true",
        "optim.eval_max_windows=256", "run.max_failures=0", "run.name=gpu-check",
    ]
    return [
        ("cuda", [python, "-c", CUDA_PROBE]),
        ("preprocess", [*cli, "preprocess", "--source", "synthetic", "--out", str(data), "--frames", "243",
                        "--stride", "27", "--set", "synthetic_frames=1000", "--no-progress"]),
        ("train", [*cli, "train", "--config", CONFIG, "--data", str(data), "--out", str(run), "--no-mlflow",
                   "--json", *[a for o in train_overrides for a in ("--set", o)]]),
        ("eval", [*cli, "eval", "--checkpoint", str(run / "model.pt"), "--data", str(data), "--device", "cuda",
                  "--max-windows", "512", "--json"]),
        ("bench_b1", [*cli, "bench", "--device", "cuda", "--batch", "1", "--warmup", "3", "--repeats", "20",
                      "--json"]),
        ("bench_b64", [*cli, "bench", "--device", "cuda", "--batch", "64", "--warmup", "2", "--repeats", "10",
                       "--json"]),
    ]


def last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (the jobs print one with --json)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_step(name: str, argv: list[str], out: Path) -> dict:
    """Run one step from the repository root; its output to out/<name>.log -> {command, rc, seconds, result}."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return {"command": " ".join(argv), "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "result": last_json(proc.stdout)}


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check", help="results (default $OUT)")
    p.add_argument("--work", default=None, help="shards and run folder (default: OUT/../h2ot-gpu-check-work)")
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(out).resolve().parent / "h2ot-gpu-check-work"  # big files stay out
    steps = plan(work.resolve(), args.steps_per_epoch, args.epochs)
    if args.dry_run:
        for name, cmd in steps:
            print(f"{name}: {' '.join(cmd)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"steps": {}}
    for name, cmd in steps:
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        report["steps"][name] = step = run_step(name, cmd, out)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(f"[gpu-check] {name}: rc {step['rc']} in {step['seconds']} s  {json.dumps(step['result'])[:300]}",
              file=sys.stderr, flush=True)
        if step["rc"] != 0:
            tail = (out / f"{name}.log").read_text().strip().splitlines()[-15:]
            raise UserError(f"gpu check: step {name} failed (rc {step['rc']}); {out / (name + '.log')} ends:\n"
                            + "\n".join(tail))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
