"""`h2ot eval --checkpoint RUN_DIR/model.pt --data SHARDS_DIR [--split test] --json`: no Ray Train.

Prints ONE JSON object: mpjpe_mm, p_mpjpe_mm, mpjve_mm (valid frames only, test-time flip unless --no-flip),
frames (valid frames counted), per_action, gflops (Linear layers, the papers' convention) and gflops_total
(FlopCounterMode + pruning), clips_per_s (inference on --device, batch --batch-size, this process), plus the
checkpoint's manifest hash and whether it matches the shards'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jobs._common import UserError, add_output_flags, friendly_errors, setup_logging, shard_manifest


def resolve_device(device: str) -> Any:
    """--device as a torch.device ("auto": CUDA when present); a clear error for one this machine lacks."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device}: not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); "
                        "use --device cpu")
    return dev


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, split: str = "test", *,
                        test_flip: bool = True, batch_size: int = 64, max_windows: int | None = None,
                        threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Metrics of a checkpoint on a shard folder's split (see the module docstring for the keys)."""
    import torch

    from h2ot.checkpoint import load_checkpoint
    from h2ot.flops import model_gflops
    from jobs.evaluation import ShardMismatch, check_frames, evaluate, load_windows

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    model, payload = load_checkpoint(checkpoint)
    from h2ot.config import config_from_dict

    mcfg = config_from_dict({"kind": "model", "model": payload["model_config"]}).model
    manifest = shard_manifest(data_dir)
    try:
        check_frames(int(manifest["frames"]), mcfg.frames, str(data_dir))
    except ShardMismatch as e:
        raise UserError(f"{checkpoint}: {e}") from None
    data = load_windows(data_dir, split, max_windows)
    flops = model_gflops(model, mcfg)  # on the CPU, before the model moves
    acc, timing = evaluate(model.to(dev), data, mcfg.in_channels, batch_size, test_flip)
    if timing["nonfinite_clips"]:
        raise UserError(f"{checkpoint}: the model predicts NaN or infinite poses for {timing['nonfinite_clips']:.0f}"
                        f" of {timing['clips']:.0f} clips of {data_dir}; the checkpoint cannot be evaluated")
    result = acc.result()
    meta = payload.get("meta", {})
    return {
        "mpjpe_mm": result["mpjpe_mm"],
        "p_mpjpe_mm": result["p_mpjpe_mm"],
        "mpjve_mm": result["mpjve_mm"],
        "frames": result["frames"],
        "per_action": result["per_action"],
        "gflops": flops["gflops_linear"],
        "gflops_total": flops["gflops_total"],
        "clips_per_s": timing["clips"] / max(timing["seconds"], 1e-9),
        "clips": int(timing["clips"]),
        "test_flip": test_flip,
        "split": split,
        "data": str(data_dir),
        "checkpoint": str(checkpoint),
        "device": str(dev),
        "model": {"backbone": mcfg.backbone, "frames": mcfg.frames, "dim": mcfg.dim, "depth": mcfg.depth,
                  "schedule": mcfg.schedule, **({"tpm": mcfg.tpm, "trm": mcfg.trm} if mcfg.schedule else {})},
        "manifest_hash": meta.get("manifest_hash"),
        "same_data_as_training": meta.get("manifest_hash") == manifest.get("content_hash"),
        "git_rev": meta.get("git_rev"),
        "epoch": meta.get("epoch"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="h2ot eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/model.pt (h2ot checkpoint format)")
    p.add_argument("--data", required=True, help="shard folder (manifest.json, train/, test/)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--no-flip", action="store_true", help="no test-time flip averaging")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-windows", type=int, default=None, help="evenly spaced subset of windows (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (CUDA when present); default cpu")
    add_output_flags(p, "print one JSON object (default: a short summary)")
    return p.parse_args(argv)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    try:
        out = evaluate_checkpoint(args.checkpoint, args.data, args.split, test_flip=not args.no_flip,
                                  batch_size=args.batch_size, max_windows=args.max_windows, threads=args.threads,
                                  device=args.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['split']}: MPJPE {out['mpjpe_mm']:.2f} mm  P-MPJPE {out['p_mpjpe_mm']:.2f} mm  "
              f"MPJVE {out['mpjve_mm']:.2f} mm  ({out['frames']} frames, {out['gflops']:.3f} GFLOPs/clip, "
              f"{out['clips_per_s']:.1f} clips/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
