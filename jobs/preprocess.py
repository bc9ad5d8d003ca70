"""`h2ot preprocess`: raw pose data -> Parquet window shards + manifest.json (see pipelines/).

    h2ot preprocess --source h36m --input ../shared/data/h36m/data_3d_h36m.npz --out outputs/h36m_f81 \
        --frames 81 --stride 27
    h2ot preprocess --source h36m --input data/h36m/data_3d_*.npz --out outputs/h36m_all --frames 243
    h2ot preprocess --source synthetic --out outputs/synthetic_f27 --frames 27
    RAY_ADDRESS=HOST:PORT h2ot preprocess ...   # on a running cluster (else a local Ray of its own)
    h2ot preprocess --config configs/preprocess_h36m_f81.yaml --set noise_px=5
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from jobs._common import UserError, friendly_errors, setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="h2ot preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML of kind `preprocess` (command-line options override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--source", choices=["h36m", "cmu", "bvh", "3dhp", "synthetic"])
    p.add_argument("--input", nargs="+", help="raw data file or folder; h36m: also several files, a folder of "
                   "data_3d_*.npz or a glob (quoted), each file's sequences distinct")
    p.add_argument("--input-2d", dest="input_2d", help="h36m: data_2d_h36m_<detector>.npz")
    p.add_argument("--out", help="output folder (manifest.json, train/, test/)")
    p.add_argument("--frames", type=int, help="window length T (default 243)")
    p.add_argument("--stride", type=int, help="training window stride (default 81)")
    p.add_argument("--test-stride", dest="test_stride", type=int, help="test window stride (default: --frames)")
    p.add_argument("--train-subjects", dest="train_subjects", nargs="+")
    p.add_argument("--test-subjects", dest="test_subjects", nargs="+")
    p.add_argument("--min-frames", dest="min_frames", type=int)
    p.add_argument("--rows-per-shard", dest="rows_per_shard", type=int, help="windows per Parquet file")
    p.add_argument("--noise-px", dest="noise_px", type=float, help="detector-like 2D noise std, pixels")
    p.add_argument("--dropout", type=float, help="probability of dropping a joint's 2D")
    p.add_argument("--seed", type=int)
    p.add_argument("--cameras", dest="n_cameras", type=int, help="virtual cameras (cmu, bvh, synthetic)")
    p.add_argument("--strict", action="store_true", default=None, help="fail on the first bad sequence")
    p.add_argument("--no-ray", dest="use_ray", action="store_false", default=None,
                   help="process in this process instead of a Ray Data pipeline")
    p.add_argument("--num-cpus", dest="num_cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace):
    """CLI arguments (+ optional YAML and --set overrides) -> PreprocessConfig."""
    from h2ot.config import apply_overrides, config_from_dict, load_yaml
    from pipelines.config import PreprocessConfig  # noqa: F401  (registers the `preprocess` kind)

    data = load_yaml(args.config) if args.config else {"kind": "preprocess"}
    skip = {"config", "set", "verbose"}
    for name, value in vars(args).items():
        if name not in skip and value is not None:
            data[name] = value
    data = apply_overrides(data, args.set)
    return config_from_dict(data, "preprocess")


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("ray").setLevel(logging.WARNING)
    from pipelines.build import build_shards
    from pipelines.records import PipelineError

    cfg = config_from_args(args)
    if not cfg.out:
        raise UserError("--out is required")
    try:
        m = build_shards(config=cfg)
    except PipelineError as e:
        raise UserError(str(e)) from None
    c = m["counts"]
    state = "up to date, nothing done" if m["up_to_date"] else f"built in {m['seconds']:.1f} s"
    print(f"{cfg.out}: {state}{' (SYNTHETIC data)' if m['synthetic'] else ''}\n"
          f"  sequences: {m['sequences_in']} in, {m['sequences_written']} written, "
          f"{m['sequences_quarantined']} quarantined, {m.get('sequences_skipped', 0)} skipped\n"
          f"  windows: train {c['train']['windows']} ({len(c['train']['windows_by_subject'])} subjects), "
          f"test {c['test']['windows']} ({len(c['test']['windows_by_subject'])} subjects), {m['frames']} frames\n"
          f"  bytes: {m['bytes']['total'] / 1e6:.1f} MB ({m['bytes_ratio']:.2f}x the float32 tensors)")
    for q in m["quarantine"][:10]:
        print(f"  quarantined {q.get('file')}: {q.get('subject')}/{q.get('action')} camera {q.get('camera')}: "
              f"{q['reason']}")
    if len(m["quarantine"]) > 10:
        print(f"  ... {len(m['quarantine']) - 10} more in {cfg.out}/manifest.json")
    for reason, count in Counter(s["reason"] for s in m.get("skipped", [])).most_common(10):
        print(f"  skipped {count} sequence{'s' if count > 1 else ''}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
