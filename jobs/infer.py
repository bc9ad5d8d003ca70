"""`h2ot infer`: 2D keypoints of a video (COCO-17 or H36M-17; .npy/.npz/.json) -> 3D poses and pictures.

    h2ot infer --checkpoint model.pt --input keypoints.json --layout coco17 --width 1920 --height 1080 --out out/

Writes to --out: poses_3d.npz (key `poses_3d`, [T, 17, 3] metres, root-relative camera frame, H36M-17 order;
also `keypoints_2d`, the H36M-17 pixel input after conversion and gap filling), poses_3d.json with --json,
input_output.png, kept_frames.png and skeleton.gif (skeleton.mp4 where ffmpeg exists). Formats and the
COCO -> H36M mapping: docs/INFER.md and h2ot/keypoints.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jobs._common import UserError, friendly_errors, load_model, setup_logging

log = logging.getLogger("h2ot.infer")


def build_parser() -> argparse.ArgumentParser:
    from h2ot.keypoints import DEFAULT_MAX_GAP, LAYOUTS
    from h2ot.viz import MAX_ANIMATION_FRAMES

    p = argparse.ArgumentParser(prog="h2ot infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model: .pt (h2ot train) or .onnx (h2ot export)")
    p.add_argument("--runtime", choices=("eager", "compile", "onnx"), default=None,
                   help="eager PyTorch (default for .pt), torch.compile, or ONNX Runtime (default for .onnx; a .pt is "
                        "exported first): docs/DEPLOY.md")
    p.add_argument("--input", required=True, help="2D keypoints: .npy/.npz [T, 17, 2|3] or .json (docs/INFER.md)")
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="joint order of the input keypoints")
    p.add_argument("--width", type=int, help="image width in pixels (required)")
    p.add_argument("--height", type=int, help="image height in pixels (required)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="also write poses_3d.json")
    p.add_argument("--no-flip", action="store_true", help="no test-time flip averaging (about 2x faster)")
    p.add_argument("--stride", type=int, default=None, help="frames between windows (default: half a window)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--max-gap", type=int, default=DEFAULT_MAX_GAP,
                   help="longest run of missing (NaN) frames per joint that is interpolated (default %(default)s)")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="treat keypoints scored below this as missing (then interpolated like NaN); default off")
    p.add_argument("--animation", choices=("auto", "gif", "mp4", "none"), default="auto",
                   help="3D skeleton animation: auto = mp4 where ffmpeg exists, else gif")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate of the animation")
    p.add_argument("--animation-frames", type=int, default=MAX_ANIMATION_FRAMES,
                   help="longer sequences are subsampled to this many animation frames (default %(default)s)")
    p.add_argument("--no-pictures", action="store_true", help="write only the poses")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> None:
    missing = [name for name in ("width", "height") if getattr(args, name) is None]
    if missing:
        raise UserError(
            f"missing image size: give --{' and --'.join(missing)} (pixels of the video the keypoints come from); "
            "it is needed to normalise the keypoints as in training"
        )
    if args.width <= 0 or args.height <= 0:
        raise UserError(f"--width and --height must be positive pixels, got {args.width}x{args.height}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_gap < 0:
        raise UserError(f"--max-gap must be >= 0, got {args.max_gap}")
    if args.fps <= 0:
        raise UserError(f"--fps must be positive, got {args.fps}")
    if args.animation_frames < 1:
        raise UserError(f"--animation-frames must be >= 1, got {args.animation_frames}")
    if args.animation == "mp4" and not args.no_pictures:
        from h2ot.viz import ffmpeg_available

        if not ffmpeg_available():
            raise UserError("--animation mp4 needs ffmpeg on PATH; use --animation gif")


def load_model_for(checkpoint: str, runtime: str | None, device: str = "cpu"):
    """(model, cfg) for `checkpoint` in `runtime` (None: eager for .pt, onnx for .onnx)."""
    runtime = runtime or ("onnx" if str(checkpoint).endswith(".onnx") else "eager")
    if runtime == "eager" and not str(checkpoint).endswith(".onnx"):
        return load_model(checkpoint, device)
    if device != "cpu" and runtime == "onnx":
        raise UserError("--runtime onnx runs on the CPU (ONNX Runtime's CPU provider); use --device cpu")
    from jobs.export import load_runtime_model

    return load_runtime_model(checkpoint, runtime)


def _write_json(path: Path, poses, fps: float) -> None:
    from h2ot.skeleton import JOINT_NAMES

    doc = {
        "joint_names": list(JOINT_NAMES),
        "units": "metres",
        "frame": "camera (x right, y down, z forward), root-relative (pelvis at 0)",
        "fps": fps,
        "poses_3d": [[[round(float(v), 5) for v in joint] for joint in frame] for frame in poses],
    }
    path.write_text(json.dumps(doc))


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    _check_args(args)

    import numpy as np

    from h2ot.inference import infer_sequence
    from h2ot.keypoints import load_sequence, model_input

    try:
        kp_pixels, filled = load_sequence(args.input, args.layout, args.max_gap, args.min_score)
    except ValueError as e:
        raise UserError(str(e)) from None
    if filled:
        log.info("interpolated %d missing joint positions (gaps of at most %d frames)", filled, args.max_gap)
    model, cfg = load_model_for(args.checkpoint, args.runtime, args.device)
    try:
        x = model_input(kp_pixels, args.width, args.height, cfg.in_channels)
        result = infer_sequence(
            model, cfg, x, stride=args.stride, test_flip=not args.no_flip, batch_size=args.batch_size,
            device=args.device,
        )
    except ValueError as e:
        raise UserError(str(e)) from None

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    written = [out / "poses_3d.npz"]
    np.savez(written[0], poses_3d=result.poses_3d, keypoints_2d=kp_pixels.astype(np.float32))
    if args.json:
        written.append(out / "poses_3d.json")
        _write_json(written[-1], result.poses_3d, args.fps)
    if not args.no_pictures:
        written += _pictures(args, out, kp_pixels, result)

    plan = result.plan
    kind = "centre-frame windows (seq2frame)" if result.seq2frame else f"windows of {plan.window}, stride {plan.stride}"
    print(
        f"infer: {plan.frames} frames in {result.seconds:.2f} s = {result.frames_per_second:.1f} frames/s "
        f"({len(plan.starts)} {kind}; flip {'off' if args.no_flip else 'on'}; {result.device})"
    )
    for path in written:
        print(f"  wrote {path}")
    return 0


def _pictures(args: argparse.Namespace, out: Path, kp_pixels, result) -> list[Path]:
    from h2ot import viz

    paths = [
        viz.plot_input_output(kp_pixels, result.poses_3d, out / "input_output.png", width=args.width,
                              height=args.height),
        viz.plot_kept_frames(result, out / "kept_frames.png"),
    ]
    fmt = args.animation
    if fmt == "auto":
        fmt = "mp4" if viz.ffmpeg_available() else "gif"
    if fmt != "none":
        paths.append(viz.animate_3d(result.poses_3d, out / f"skeleton.{fmt}", fps=args.fps,
                                    max_frames=args.animation_frames))
    return paths


if __name__ == "__main__":
    sys.exit(main())
