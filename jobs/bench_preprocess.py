"""`h2ot bench-preprocess [--json]`: the Ray Data pipeline vs a plain single-process loop on the same input.

    h2ot bench-preprocess --json                      # the shared Human3.6M file if present, else synthetic
    h2ot bench-preprocess --source h36m --input ../shared/data/h36m/data_3d_h36m.npz --num-cpus 2 --json
    h2ot bench-preprocess --address auto --copies 10 --json            # a running cluster, 10 distinct files
    h2ot bench-preprocess --address HOST:PORT --copies 10 --ray-only --json --workdir DIR   # scaling runs

Both builds are `h2ot preprocess` jobs in fresh processes with the same config and writer and must write
byte-identical shards (pipelines.bench.run_bench); prints windows per second of each, their ratio, the shard size
ratio, the peak memory (PSS summed over each job's processes) and where the time went. With --address the Ray
job runs on that cluster, timed from its start to its end (the cluster's own start is not timed). --copies N
writes N - 1 rotated copies of the input once into --workdir (default: the system's temporary folder) and builds
on all N files. The jobs inherit this environment: for a cluster with token auth set RAY_AUTH_MODE=token (and
RAY_AUTH_TOKEN_PATH where the token is not in ~/.ray), as `h2ot cluster` prints. The machine's load averages
before and after are in the figures: on a shared machine they are not a benchmark.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs._common import friendly_errors, print_figures

DEFAULT_H36M = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "h36m" / "data_3d_h36m.npz"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="h2ot bench-preprocess", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--source", default=None, help="default: h36m if the shared file exists, else synthetic")
    p.add_argument("--input", default=None)
    p.add_argument("--frames", type=int, default=243)
    p.add_argument("--stride", type=int, default=81)
    p.add_argument("--num-cpus", dest="num_cpus", type=int, default=2, help="CPUs of the local Ray (not with "
                   "--address)")
    p.add_argument("--address", default=None, help="run the Ray job on this running cluster (HOST:PORT of its "
                   "GCS, or auto) instead of a local Ray it starts itself")
    p.add_argument("--copies", type=int, default=1, help="build on N distinct files of the input's size (h36m): "
                   "the input and N-1 rotated copies, written once into --workdir")
    p.add_argument("--ray-only", dest="ray_only", action="store_true", help="skip the single-process build")
    p.add_argument("--workdir", default=None, help="where the copies are kept and the builds go (default: system "
                   "temp); on a multi-node cluster, a folder every node sees")
    p.add_argument("--json", action="store_true", help="print only the JSON figures")
    return p.parse_args(argv)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pipelines.bench import run_bench
    from pipelines.records import PipelineError

    source, inp = args.source, args.input
    if source is None:
        source = "h36m" if (inp or DEFAULT_H36M.is_file()) else "synthetic"
    if source == "h36m" and inp is None:
        inp = str(DEFAULT_H36M.resolve())
    try:
        figures = run_bench(source, inp, args.frames, args.stride, args.num_cpus, args.workdir,
                            address=args.address, copies=args.copies, ray_only=args.ray_only)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_figures(figures, args.json, width=22)
    return 0


if __name__ == "__main__":
    sys.exit(main())
