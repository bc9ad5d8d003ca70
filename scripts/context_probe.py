"""Does a trained model use its temporal context? Two measures on the test split of a shard folder.

usage: python scripts/context_probe.py positions --data SHARDS MODEL.pt [MODEL.pt ...] [--max-windows 2216]
       python scripts/context_probe.py kept --data SHARDS MODEL.pt [MODEL.pt ...] [--max-windows 2216]

positions: MPJPE (mm, valid frames, test-time flip) per position in the window, on `--max-windows` evenly spaced
           test windows. A model that uses its neighbours is worse at the window's edges (context on one side
           only); a flat profile is a per-frame lift.
kept:      for an H2OT model on shards with dropped joints (`h2ot preprocess --dropout`, confidence 0 at an
           outlier position): how often the frames each TPM stage keeps hold an outlier joint, against all frames.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from h2ot.checkpoint import load_checkpoint
from h2ot.config import config_from_dict
from h2ot.engine import batch_input
from h2ot.metrics import M_TO_MM, per_frame_error_m
from h2ot.models import predict
from jobs.evaluation import load_windows


def inputs(data: dict[str, np.ndarray], in_channels: int, rows: slice = slice(None)) -> torch.Tensor:
    """The model's input for windows `rows`, with the confidence channel when the model takes one."""
    conf = torch.from_numpy(data["conf_2d"][rows]) if in_channels == 3 else None
    return batch_input(torch.from_numpy(data["pose_2d"][rows]), conf, in_channels)


def position_errors(model: torch.nn.Module, data: dict[str, np.ndarray], in_channels: int,
                    batch: int = 128) -> np.ndarray:
    """[N, T] per-frame MPJPE in mm, NaN on padded frames."""
    errors = []
    with torch.no_grad():
        for i in range(0, len(data["valid"]), batch):
            rows = slice(i, i + batch)
            pred = predict(model, inputs(data, in_channels, rows), test_flip=True).pose_3d
            err = per_frame_error_m(pred, torch.from_numpy(data["pose_3d"][rows])) * M_TO_MM
            err[~torch.from_numpy(data["valid"][rows]).bool()] = float("nan")
            errors.append(err.numpy())
    return np.concatenate(errors)


def kept_outliers(model: torch.nn.Module, data: dict[str, np.ndarray], in_channels: int) -> None:
    """Print, per TPM stage, the share of kept frames holding an outlier joint against the share of all frames."""
    has_outlier = (data["conf_2d"] == 0).any(-1)  # [N, T]
    with torch.no_grad():
        kept = model(inputs(data, in_channels)).kept_indices
    if not kept:
        raise SystemExit("the model prunes no tokens (empty schedule)")
    for stage, idx in enumerate(kept):
        share = np.take_along_axis(has_outlier, idx.numpy(), axis=1).mean()
        print(f"stage {stage}: {idx.shape[1]} frames kept; frames with an outlier joint: "
              f"{share:.3f} of the kept, {has_outlier.mean():.3f} of all")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("measure", choices=["positions", "kept"])
    p.add_argument("checkpoints", nargs="+", metavar="MODEL.pt", help="model.pt of `h2ot train`")
    p.add_argument("--data", required=True, help="shard folder of `h2ot preprocess` (its test split is read)")
    p.add_argument("--max-windows", type=int, default=2216, help="evenly spaced test windows (default: 1/4 of S9)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_windows(args.data, "test", args.max_windows)
    if args.measure == "kept" and (data["conf_2d"] > 0).all():
        raise SystemExit(f"{args.data}: no dropped joints (confidence 0); build shards with h2ot preprocess --dropout")
    for path in args.checkpoints:
        model, payload = load_checkpoint(path)
        model.eval()
        in_channels = config_from_dict({"kind": "model", "model": payload["model_config"]}).model.in_channels
        if args.measure == "kept":
            print(path)
            kept_outliers(model, data, in_channels)
            continue
        err = position_errors(model, data, in_channels)
        profile = " ".join(f"{e:.0f}" for e in np.nanmean(err, axis=0))
        print(f"{path}: all {np.nanmean(err):.1f} mm; by position {profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
