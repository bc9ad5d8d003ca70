"""The `h2ot` command line: one dispatcher over every subcommand.

Each subcommand is a module with `main(argv: list[str] | None) -> int`, imported only when it runs, so
`h2ot bench` never imports Ray. `h2ot train ...` and `python -m jobs.train ...` are the same program,
which is what `ray job submit -- python -m jobs.<name>` relies on.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Later work adds lines here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "the whole system end to end: Ray Data -> Ray Train (full vs H2OT) -> eval -> MLflow"),
    "bench": ("jobs.bench", "FLOPs and throughput of full vs HoT vs H2OT, per runtime and precision; --stream"),
    "preprocess": ("jobs.preprocess", "raw pose data -> Parquet window shards + manifest (Ray Data)"),
    "bench-preprocess": ("jobs.bench_preprocess", "Ray Data vs single-process preprocessing throughput (JSON)"),
    "bench-preprocess-scaling": ("jobs.bench_preprocess_scaling", "Ray preprocessing on 1, 2, .. cluster nodes (JSON)"),
    "cluster": ("jobs.cluster", "local multi-node Ray cluster + MLflow server: up | down | status | exec"),
    "infer": ("jobs.infer", "2D keypoints of a video (COCO-17/H36M-17) -> 3D poses, pictures, animation"),
    "export": ("jobs.export", "a checkpoint -> one ONNX graph with the pruning inside, verified against PyTorch"),
    "stream": ("jobs.stream", "2D keypoints as JSON lines on stdin -> one 3D pose per frame on stdout, live"),
    "train": ("jobs.train", "train a model with Ray Train (DDP), tracked in MLflow; best model -> RUN_DIR/model.pt"),
    "eval": ("jobs.eval", "MPJPE / P-MPJPE / MPJVE of a checkpoint on a shard folder (JSON), without Ray"),
    "tune": ("jobs.tune", "Ray Tune over pruning schedules, TPM/TRM and lr; GFLOPs-MPJPE Pareto front in MLflow"),
    "gpu-check": ("jobs.gpu_check", "on a GPU machine: paper-size H2OT training with AMP, eval and bench on cuda"),
    "bench-train": ("jobs.bench_train", "samples/s of the Ray Train loop (1, 2 workers) vs a plain PyTorch loop"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: h2ot <command> [options]   (h2ot <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"h2ot: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
