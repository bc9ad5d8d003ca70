"""`h2ot bench`: full vs pruned models, side by side, in every runtime and precision (FLOPs and clips/s).

    h2ot bench --json [--small] [--model mixste|dstformer] [--preset P | --config configs/X.yaml | --checkpoint M.pt]
               [--runtime eager,compile,onnx] [--precision fp32,bf16,int8] [--batch N] [--data SHARDS]
    h2ot bench --stream --checkpoint (M.pt|M.onnx) [--fps 50] [--hop N] [--no-flip]   (live keypoints: jobs/stream.py)
    h2ot bench --preset mixste --reference-code DIR   (beside the official MixSTE / HoT code: jobs/bench_reference.py)

Models: a preset gives full vs the HoT point vs its H2OT schedule; `--config` a shipped config (full = the same
model without its schedule); `--checkpoint` a trained model with its weights (full = its config without schedule,
same weights where they exist: a speed reference only). Every (model, runtime, precision) is timed in one process
on the same input: interleaved rounds (in each, every entry runs a burst of forwards back to back, about 20 ms
of them: `--burst`), warm-up rounds excluded, medians; without `--repeats` the timed rounds fill at least
`--seconds` (10 s), so fast models at batch 1 get hundreds of them. The
JSON gives clips/s per entry and the ratios side by side (pruned / full in each runtime and precision, and each
runtime or precision / eager fp32 of the same model). bf16 is autocast on the CPU (eager, compile); int8 is ONNX
Runtime's dynamic quantization of the MatMul weights (onnx). `--data` adds each entry's MPJPE (no flip) on the
shards' test windows, so the accuracy cost of a precision sits beside its speed. Nothing here is a timed
assertion; figures measured on a loaded machine are not results (docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs._common import UserError, friendly_errors

HOT_POINT_FRACTION = 1 / 3  # HoT keeps 81 of 243 frames
# ... before block 3 of 8 on MixSTE, before block 1 of 5 on MotionBERT's DSTformer (the HoT paper's points).
HOT_BLOCK_FRACTION = {"mixste": (3, 8), "dstformer": (1, 5)}
MODELS = ("mixste", "dstformer")
RUNTIMES = ("eager", "compile", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")
PRECISIONS_OF = {"eager": ("fp32", "bf16"), "compile": ("fp32", "bf16"), "onnx": ("fp32", "int8")}
DEFAULT_ACCURACY_WINDOWS = 256
DEFAULT_SECONDS = 10.0  # timed rounds fill at least this long unless --repeats is given
MAX_ROUNDS = 5000
BURST_SECONDS = 0.02  # an entry's timed forwards in a round, back to back, fill about this long
MAX_BURST = 50


def _variants(preset: str) -> dict:
    from h2ot.config import MODEL_PRESETS, config_from_dict

    base = MODEL_PRESETS[preset]
    frames, depth = base["frames"], base["depth"]
    num, den = HOT_BLOCK_FRACTION.get(base["backbone"], (3, 8))
    block = max(1, num * depth // den)  # never block 0: pruning right after the embedding costs accuracy
    hot = [[block, round(frames * HOT_POINT_FRACTION)]]
    schedules = {"full": [], "hot": hot, "h2ot": base["schedule"]}
    return {
        name: config_from_dict({"kind": "model", "model": {"preset": preset, "schedule": s}}).model
        for name, s in schedules.items()
    }


def _config_variants(cfg) -> dict:
    """full (no schedule) and, when the config prunes, h2ot (the config itself)."""
    import dataclasses

    variants = {"full": dataclasses.replace(cfg, schedule=[])}
    if cfg.stages:
        variants["h2ot"] = cfg
    return variants


def _models(args: argparse.Namespace) -> tuple[str, dict, dict]:
    """(label, {name: cfg}, {name: model}) for the chosen source."""
    import torch

    from h2ot.models import build_model

    if args.checkpoint:
        from jobs._common import load_model

        trained, cfg = load_model(args.checkpoint)
        cfgs = _config_variants(cfg)
        models = {}
        for name, c in cfgs.items():
            if c is cfg:
                models[name] = trained
            else:  # same weights where the parameters exist (a speed reference, not a trained full model)
                models[name] = build_model(c).eval()
                models[name].load_state_dict(trained.state_dict(), strict=False)
        return Path(args.checkpoint).name, cfgs, models
    if args.config:
        import jobs.settings  # noqa: F401  (registers the train kind: --config may be a model or a train file)
        from h2ot.config import load_config

        loaded = load_config(args.config)
        cfg = getattr(loaded, "model", loaded)
        cfgs = _config_variants(cfg)
        label = Path(args.config).stem
    else:
        label = args.preset or (f"{args.model}_small" if args.small else args.model)
        cfgs = _variants(label)
    torch.manual_seed(0)
    return label, cfgs, {name: build_model(c).eval() for name, c in cfgs.items()}


@dataclass
class Entry:
    """One timed thing: a model in a runtime and precision. `run` takes the input [B, T, J, C]; `model` returns
    PoseOutput (for accuracy)."""

    variant: str
    runtime: str
    precision: str
    run: Callable
    model: object

    @property
    def key(self) -> str:
        if self.runtime == "eager" and self.precision == "fp32":
            return self.variant  # the historical key names: full_clips_per_s, ...
        return f"{self.variant}_{self.runtime}_{self.precision}"


class _Autocast:
    """A torch model run under CPU bf16 autocast (outputs cast back to fp32)."""

    training = False

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(x)
        out.pose_3d = out.pose_3d.float()
        return out

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def _entries(cfgs: dict, models: dict, runtimes: list[str], precisions: list[str], threads: int | None,
             workdir: Path) -> tuple[list[Entry], list[str]]:
    """Every valid (variant, runtime, precision), and notes on the combinations skipped."""
    import torch

    entries, skipped = [], []
    for runtime in runtimes:
        for precision in precisions:
            if precision not in PRECISIONS_OF[runtime]:
                skipped.append(f"{runtime}/{precision}")
                continue
            for name, model in models.items():
                entries.append(_entry(name, cfgs[name], model, runtime, precision, threads, workdir, torch,
                                      onnx_spin=runtimes == ["onnx"]))
    return entries, skipped


def _entry(name, cfg, model, runtime, precision, threads, workdir: Path, torch, onnx_spin: bool = True) -> Entry:
    """One timed model. ONNX Runtime's threads spin after each run by default; timed beside eager or compiled
    models in one process they would take those models' cores (measured: an eager model at a fifth of its speed
    next to spinning ONNX sessions), so they spin only when ONNX is the only runtime of the run."""
    if runtime == "onnx":
        from h2ot.export import OnnxPoseModel, export_onnx, quantize_int8
        from jobs.export import quiet_exporter

        path = workdir / f"{name}.onnx"
        with quiet_exporter():
            if not path.exists():
                export_onnx(model, cfg, path)
            if precision == "int8":
                path = quantize_int8(path, workdir / f"{name}.int8.onnx")
        onnx_model = OnnxPoseModel(path, threads, spin=onnx_spin)
        return Entry(name, runtime, precision, lambda x, m=onnx_model: m.run(x.numpy()), onnx_model)
    target = torch.compile(model) if runtime == "compile" else model
    wrapped = _Autocast(target) if precision == "bf16" else target
    return Entry(name, runtime, precision, wrapped, wrapped)


def _time(entries: list[Entry], x, repeats: int, warmup: int, seconds: float = 0.0,
          burst: int | None = None) -> tuple[dict[str, float], int, int]:
    """(Median seconds per forward of each entry, timed rounds, burst). The entries take turns, round by round, so
    the machine's drift reaches all of them alike. In its turn an entry runs `burst` timed forwards back to back
    (after one untimed forward when burst > 1), as a model runs in use: with its own weights and code in the caches,
    not the other entries' (one forward a turn flattered pruned models at batch 1: their eager pruned/full ratios
    measured 7-20 % higher than back to back, docs/DEPLOY.md). burst None: forwards filling about
    BURST_SECONDS (1 for slow models). Rounds: `repeats`, or more while they fill less than `seconds` (one round
    of small models at batch 1 takes milliseconds, and a few dozen rounds vary by 10-25 % between runs), at most
    MAX_ROUNDS; both counts come from the last warm-up round."""
    import torch
    from tqdm import tqdm

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)  # time kernels, not launches

    def one_round(timed: dict[str, list[float]] | None, forwards: int) -> float:
        round_start = time.perf_counter()
        for entry in entries:
            if forwards > 1:
                entry.run(x)
            sync()
            start = time.perf_counter()
            for _ in range(forwards):
                entry.run(x)
            sync()
            if timed is not None:
                timed[entry.key].append((time.perf_counter() - start) / forwards)
        return time.perf_counter() - round_start

    times: dict[str, list[float]] = {e.key: [] for e in entries}
    with torch.inference_mode():
        last = 0.0
        for _ in tqdm(range(warmup), desc="bench warm-up", unit="round", file=sys.stderr, disable=warmup < 2):
            last = one_round(None, 1)
        per_forward = max(last, 1e-6) / len(entries)
        if burst is None:
            burst = min(MAX_BURST, max(1, round(BURST_SECONDS / per_forward))) if warmup else 1
        if seconds and warmup:
            round_s = len(entries) * per_forward * (burst + (burst > 1))
            repeats = max(repeats, min(MAX_ROUNDS, math.ceil(seconds / round_s)))
        for _ in tqdm(range(repeats), desc="bench", unit="round", file=sys.stderr):
            one_round(times, burst)
    return {key: statistics.median(t) for key, t in times.items()}, repeats, burst


def run_bench(preset: str | None = None, repeats: int = 20, warmup: int = 1, threads: int | None = None,
              batch: int = 1, *, args: argparse.Namespace | None = None, seconds: float = 0.0) -> dict:
    """Time every entry and report clips/s, FLOPs and the ratios (module docstring)."""
    import torch

    from h2ot.flops import model_gflops

    args = args or argparse.Namespace(checkpoint=None, config=None, preset=preset, model="mixste", small=False,
                                      runtime="eager", precision="fp32", data=None, windows=DEFAULT_ACCURACY_WINDOWS,
                                      reference_code=None, burst=None)
    if threads:
        torch.set_num_threads(threads)
    label, cfgs, models = _models(args)
    runtimes, precisions = _listed(args.runtime, RUNTIMES, "--runtime"), _listed(args.precision, PRECISIONS,
                                                                                 "--precision")
    flops = {name: model_gflops(models[name], cfgs[name]) for name in models}  # counted on the CPU
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type != "cpu":
        if any(r == "onnx" for r in runtimes):
            raise UserError(f"--runtime onnx runs on the CPU here; use eager or compile with --device {device}")
        models = {name: m.to(device) for name, m in models.items()}
    with tempfile.TemporaryDirectory(prefix="h2ot-bench-") as workdir:
        entries, skipped = _entries(cfgs, models, runtimes, precisions, threads, Path(workdir))
        if not entries:
            raise UserError(f"no runtime runs the precisions {precisions}: bf16 runs in eager/compile, int8 in onnx")
        reference = {}
        if getattr(args, "reference_code", None):
            from jobs.bench_reference import reference_entries

            official, reference = reference_entries(args.reference_code, cfgs["full"], runtimes, device)
            entries += official
        full = cfgs["full"]
        x = torch.randn(batch, full.frames, full.joints, full.in_channels,
                        generator=torch.Generator().manual_seed(0)).to(device)
        timed, rounds, burst = _time(entries, x, repeats, warmup, seconds, args.burst)
        accuracy = _accuracy(entries, cfgs, args) if args.data else {}
    out = {"model": label, "frames": full.frames, "batch": batch, "device": str(device),
           "schedules": {name: c.schedule for name, c in cfgs.items()}}
    if "hot" in cfgs:
        out["hot_schedule"] = cfgs["hot"].schedule
    if "h2ot" in cfgs:
        out["h2ot_schedule"] = cfgs["h2ot"].schedule
    for name in models:
        out[f"{name}_gflops"] = round(flops[name]["gflops_total"], 3)
        out[f"{name}_gflops_linear"] = round(flops[name]["gflops_linear"], 3)
    for name in cfgs:
        if name != "full":
            out.update(_flops_ratios(name, flops))
    for entry in entries:
        out[f"{entry.key}_clips_per_s"] = round(batch / timed[entry.key], 4)
    out.update(_throughput_ratios(entries, timed))
    if reference:
        from jobs.bench_reference import reference_ratios

        out.update(reference)
        out.update(reference_ratios(entries, timed))
    if accuracy:
        out["mpjpe_mm"] = accuracy
    if skipped:
        out["skipped"] = skipped
    out["repeats"] = rounds
    out["burst"] = burst
    out["torch_threads"] = torch.get_num_threads()
    return out


def _flops_ratios(name: str, flops: dict) -> dict:
    prefix = "" if name == "h2ot" else f"{name}_"
    full = flops["full"]
    out = {f"{prefix}flops_ratio": round(flops[name]["gflops_total"] / full["gflops_total"], 4),
           f"{prefix}flops_ratio_linear": round(flops[name]["gflops_linear"] / full["gflops_linear"], 4)}
    if name == "h2ot":
        out["predicted_flops_ratio"] = round(flops[name]["gflops_predicted_total"] / full["gflops_predicted_total"], 4)
    return out


def _throughput_ratios(entries: list[Entry], seconds: dict[str, float]) -> dict:
    """pruned / full in each runtime and precision; each runtime and precision / eager fp32 of the same model."""
    out = {}
    by = {(e.variant, e.runtime, e.precision): e.key for e in entries if not e.variant.startswith("official_")}
    for (variant, runtime, precision), key in by.items():
        suffix = "" if (runtime, precision) == ("eager", "fp32") else f"_{runtime}_{precision}"
        if variant != "full" and ("full", runtime, precision) in by:
            name = "throughput_ratio" if variant == "h2ot" else f"{variant}_throughput_ratio"
            out[name + suffix] = round(seconds[by["full", runtime, precision]] / seconds[key], 4)
        if suffix and (variant, "eager", "fp32") in by:
            out[f"{key}_vs_eager_fp32"] = round(seconds[by[variant, "eager", "fp32"]] / seconds[key], 4)
    if "throughput_ratio" in out and "flops_ratio" in out:
        out["speedup_efficiency"] = round(out["throughput_ratio"] * out["flops_ratio"], 4)
    return out


def _accuracy(entries: list[Entry], cfgs: dict, args: argparse.Namespace) -> dict[str, float]:
    """MPJPE (mm, no flip) of each entry on the shards' test windows."""
    from jobs._common import require_shards
    from jobs.evaluation import check_frames, evaluate, load_windows

    require_shards(args.data)
    data = load_windows(args.data, "test", args.windows)
    out = {}
    for entry in entries:
        if entry.variant not in cfgs:
            continue  # the official models (--reference-code): untrained, speed only
        cfg = cfgs[entry.variant]
        check_frames(data["pose_2d"].shape[1], cfg.frames, f"--data {args.data}")
        acc, _ = evaluate(entry.model, data, cfg.in_channels, test_flip=False)
        out[entry.key] = round(float(acc.result()["mpjpe_mm"]), 3)
    return out


def _listed(value: str, known: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        raise UserError(f"{flag} {value!r}: choose from {', '.join(known)} (comma-separated)")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h2ot bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    parser.add_argument("--model", choices=MODELS, default="mixste", help="backbone (default mixste)")
    parser.add_argument("--small", action="store_true", help="the CPU-size preset MODEL_small (fast)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="model preset (default MODEL, or MODEL_small)")
    source.add_argument("--config", default=None, help="a config file (configs/X.yaml): it vs its full model")
    source.add_argument("--checkpoint", default=None, help="a trained model (.pt; .onnx with --stream)")
    parser.add_argument("--runtime", default="eager", help="comma-separated: eager, compile, onnx (default eager)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (eager/compile), "
                                                            "int8 (onnx); default fp32")
    parser.add_argument("--data", default=None, help="shards: add each entry's MPJPE on the test windows")
    parser.add_argument("--windows", type=int, default=DEFAULT_ACCURACY_WINDOWS,
                        help="test windows for --data (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (default: 20, 5 for the paper-size presets, or more while they fill "
                             "--seconds)")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help="without --repeats: time rounds for at least this long (default %(default)s)")
    parser.add_argument("--burst", type=int, default=None,
                        help="timed forwards of an entry in its turn, back to back (default: about 20 ms of them; "
                             "1: one forward a turn)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compile: at least 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device of eager/compile runs: cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=1, help="clips per forward (default 1: one video, online)")
    parser.add_argument("--reference-code", default=None, metavar="DIR",
                        help="a checkout of the official HoT repository: time its MixSTE and HoT-MixSTE beside "
                             "ours and print ours/official (jobs/bench_reference.py)")
    stream = parser.add_argument_group("--stream: a recorded sequence fed frame by frame at --fps")
    stream.add_argument("--stream", action="store_true", help="benchmark h2ot stream (needs --checkpoint)")
    stream.add_argument("--fps", type=float, default=50.0, help="arrival rate of the frames (default 50)")
    stream.add_argument("--hop", type=int, default=None, help="frames between forwards (default: jobs/stream.py)")
    stream.add_argument("--frames", type=int, default=500, help="length of the fed sequence (default 500)")
    stream.add_argument("--stream-runtime", default=None, choices=RUNTIMES, help="runtime of the streamed model")
    stream.add_argument("--no-flip", action="store_true", help="no test-time flip (h2ot stream --no-flip)")
    return parser


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.burst is not None and args.burst < 1:
        parser.error(f"--burst must be at least 1, got {args.burst}")
    if args.stream:
        from jobs.stream import bench_stream

        if not args.checkpoint:
            raise UserError("--stream needs --checkpoint (a .pt or .onnx model)")
        if args.reference_code:
            raise UserError("--reference-code times forward passes beside ours; it does not apply to --stream")
        result = bench_stream(args.checkpoint, args.fps, args.hop, args.frames, args.stream_runtime, args.threads,
                              test_flip=not args.no_flip)
    else:
        if args.checkpoint and args.checkpoint.endswith(".onnx"):
            raise UserError("--checkpoint: give the .pt model (bench exports it itself for --runtime onnx)")
        preset = args.preset or (f"{args.model}_small" if args.small else args.model)
        repeats = args.repeats or (5 if preset in MODELS and not (args.config or args.checkpoint) else 20)
        seconds = 0.0 if args.repeats else args.seconds
        result = run_bench(repeats=repeats, warmup=args.warmup, threads=args.threads, batch=args.batch, args=args,
                           seconds=seconds)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
