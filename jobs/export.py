"""`h2ot export`: a checkpoint -> one ONNX graph (pruning inside), verified against PyTorch before it is kept.

    h2ot export --checkpoint runs/h2ot_small/model.pt --out model.onnx [--data SHARDS] [--int8] [--standard-ops]

The graph holds the whole forward pass — TPM scoring, top-n selection, gather, TRM — with a dynamic batch axis
(h2ot/export.py documents its inputs, outputs and metadata). After writing it, the command runs PyTorch and ONNX
Runtime on the same windows: real ones from `--data` (the test split of `h2ot preprocess` shards), else generated
ones, and fails (exit 1, the file removed) unless every joint agrees within `--tolerance` metres and every window
keeps the same frames. With `--data`, the report also gives both models' MPJPE on those windows; `--int8` also
writes MODEL.int8.onnx (ONNX Runtime dynamic quantization) and reports its MPJPE and kept-frame agreement, which
measures what int8 costs. Self-attention is written as ONNX Runtime's fused com.microsoft Attention node
(h2ot/export.py); `--standard-ops` keeps standard ONNX operators for other runtimes. docs/DEPLOY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from jobs._common import UserError, friendly_errors, load_model, require_shards, setup_logging
from pipelines.shards import file_sha256

log = logging.getLogger("h2ot.export")
RUNTIMES = ("eager", "compile", "onnx")
DEFAULT_TOLERANCE_M = 1e-4
GENERATED_WINDOWS = 32


NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.export")


@contextlib.contextmanager
def quiet_exporter():
    """The exporter and quantizer print progress and log at INFO (quantize_dynamic on the root logger): keep
    stdout for results and the log for ours; everything they said goes to the debug log."""
    captured = io.StringIO()
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    root_level = root.level
    try:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        root.setLevel(max(root_level, logging.WARNING))
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        root.setLevel(root_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        log.debug("exporter output:\n%s", captured.getvalue())


def write_onnx(checkpoint: str, out: str | Path, standard_ops: bool = False):
    """Export `checkpoint` to `out` with the provenance metadata -> (torch model, cfg, path). `standard_ops`: no
    ONNX Runtime contrib node (the fused attention), for other runtimes."""
    from h2ot.export import ExportError, export_onnx
    from jobs.tracking import git_revision

    model, cfg = load_model(checkpoint)
    meta = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": file_sha256(checkpoint),
            "code_revision": git_revision()}
    try:
        with quiet_exporter():
            path = export_onnx(model, cfg, out, meta, fuse_attention=not standard_ops)
    except ExportError as e:
        raise UserError(f"--checkpoint {checkpoint}: {e}") from None
    return model, cfg, path


def load_runtime_model(checkpoint: str, runtime: str, threads: int | None = None, workdir: str | Path | None = None):
    """(model, cfg) to run `checkpoint` (.pt or .onnx) in `runtime` (eager, compile or onnx).

    A .onnx file runs in ONNX Runtime only; a .pt checkpoint asked to run in onnx is exported first (to
    `workdir`, else a temporary folder that lives as long as the process)."""
    import tempfile

    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if str(checkpoint).endswith(".onnx"):
        if runtime != "onnx":
            raise UserError(f"--checkpoint {checkpoint} is an ONNX file: run it with --runtime onnx")
        return load_onnx_model(checkpoint, threads)
    if runtime == "onnx":
        folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="h2ot-onnx-"))
        _, _, path = write_onnx(checkpoint, folder / (Path(checkpoint).stem + ".onnx"))
        return load_onnx_model(str(path), threads)
    model, cfg = load_model(checkpoint)
    if runtime == "compile":
        import torch

        model = torch.compile(model)
    return model, cfg


def load_onnx_model(path: str, threads: int | None = None):
    from h2ot.export import ExportError, OnnxPoseModel

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install 'h2ot-ray[export]'") from None
    try:
        model = OnnxPoseModel(path, threads)
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file") from None
    except ExportError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types for unreadable files
        raise UserError(f"--checkpoint {path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
    return model, model.cfg


def verification_windows(cfg, data: str | None, count: int):
    """(windows [N, T, J, C] torch, shards or None): the test split's windows (evenly spaced), else generated."""
    import torch

    if data is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(count, cfg.frames, cfg.joints, cfg.in_channels, generator=g) * 0.3, None
    from h2ot.engine import batch_input
    from jobs.evaluation import check_frames, load_windows

    require_shards(data)
    shards = load_windows(data, "test", count)
    check_frames(shards["pose_2d"].shape[1], cfg.frames, f"--data {data}")
    conf = torch.from_numpy(shards["conf_2d"]) if cfg.in_channels == 3 else None
    return batch_input(torch.from_numpy(shards["pose_2d"]), conf, cfg.in_channels), shards


def mpjpe_mm(model, shards, cfg) -> float:
    from jobs.evaluation import evaluate

    acc, _ = evaluate(model, shards, cfg.in_channels, test_flip=False)
    return float(acc.result()["mpjpe_mm"])


def verify(model, cfg, path: Path, windows, shards, tolerance: float) -> dict:
    from h2ot.export import OnnxPoseModel, compare

    exported = OnnxPoseModel(path)
    agreement = compare(model, exported, windows)
    report = {"windows": agreement.windows, "source": "test split" if shards is not None else "generated",
              "max_abs_diff_m": agreement.max_abs_diff_m, "same_kept_frames": agreement.kept_equal,
              "windows_with_other_kept_frames": agreement.windows_with_other_frames,
              "ok": agreement.ok(tolerance), "tolerance_m": tolerance}
    if shards is not None:
        report["mpjpe_mm_pytorch"] = mpjpe_mm(model, shards, cfg)
        report["mpjpe_mm_onnx"] = mpjpe_mm(exported, shards, cfg)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="h2ot export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt, from h2ot train)")
    p.add_argument("--out", required=True, help="the ONNX file to write (e.g. model.onnx)")
    p.add_argument("--data", default=None, help="shards of h2ot preprocess: verify on their test windows")
    p.add_argument("--windows", type=int, default=GENERATED_WINDOWS, help="windows to verify on (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_M,
                   help="largest |ONNX - PyTorch| accepted, metres (default %(default)s)")
    p.add_argument("--int8", action="store_true", help="also write OUT.int8.onnx (dynamic int8) and measure it")
    p.add_argument("--standard-ops", action="store_true",
                   help="standard ONNX operators only: self-attention unfused (slower in ONNX Runtime; for other "
                        "runtimes)")
    p.add_argument("--json", action="store_true", help="print the verification as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.windows < 1:
        raise UserError(f"--windows must be >= 1, got {args.windows}")
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: give a file name ending in .onnx")
    model, cfg, path = write_onnx(args.checkpoint, out, args.standard_ops)
    windows, shards = verification_windows(cfg, args.data, args.windows)
    report = {"onnx": str(path), **verify(model, cfg, path, windows, shards, args.tolerance)}
    if not report["ok"]:
        path.unlink(missing_ok=True)
        print(json.dumps(report) if args.json else _text(report))
        print(f"error: the exported graph does not match PyTorch (max |diff| {report['max_abs_diff_m']:.2e} m, "
              f"same kept frames: {report['same_kept_frames']}); {path} removed", file=sys.stderr)
        return 1
    if args.int8:
        report["int8"] = _int8(model, cfg, path, windows, shards)
    print(json.dumps(report) if args.json else _text(report))
    return 0


def _int8(model, cfg, path: Path, windows, shards) -> dict:
    from h2ot.export import OnnxPoseModel, compare, quantize_int8

    with quiet_exporter():
        q_path = quantize_int8(path, path.with_suffix(".int8.onnx"))
    quantized = OnnxPoseModel(q_path)
    agreement = compare(model, quantized, windows)
    out = {"onnx": str(q_path), "max_abs_diff_m": agreement.max_abs_diff_m,
           "windows_with_other_kept_frames": agreement.windows_with_other_frames}
    if shards is not None:
        out["mpjpe_mm"] = mpjpe_mm(quantized, shards, cfg)
    return out


def _text(report: dict) -> str:
    lines = [f"export: wrote {report['onnx']}",
             f"  verified on {report['windows']} {report['source']} windows: max |ONNX - PyTorch| "
             f"{report['max_abs_diff_m']:.2e} m (tolerance {report['tolerance_m']:.0e}), "
             f"same kept frames: {'yes' if report['same_kept_frames'] else 'NO'}"]
    if "mpjpe_mm_pytorch" in report:
        lines.append(f"  MPJPE (no flip): PyTorch {report['mpjpe_mm_pytorch']:.2f} mm, "
                     f"ONNX {report['mpjpe_mm_onnx']:.2f} mm")
    if "int8" in report:
        q = report["int8"]
        mpjpe = f", MPJPE {q['mpjpe_mm']:.2f} mm" if "mpjpe_mm" in q else ""
        lines.append(f"  int8: wrote {q['onnx']}: max |int8 - PyTorch| {q['max_abs_diff_m']:.2e} m, "
                     f"{q['windows_with_other_kept_frames']} windows keep other frames{mpjpe}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
