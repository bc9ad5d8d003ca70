"""`h2ot bench --json [--small] [--model mixste|dstformer]`: full vs the HoT point vs the default H2OT schedule.

FLOPs in both conventions (linear = the papers', total = FlopCounterMode + pruning by hand) and clips/s,
measured in one process on batch 1 (`--batch N`: N clips a forward, as in offline video or `h2ot eval`):
interleaved repetitions (full, hot, h2ot, full, ...), warm-up excluded, medians. Targets are printed as ratios;
nothing here is a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from jobs._common import friendly_errors

HOT_POINT_FRACTION = 1 / 3  # HoT keeps 81 of 243 frames
# ... before block 3 of 8 on MixSTE, before block 1 of 5 on MotionBERT's DSTformer (the HoT paper's points).
HOT_BLOCK_FRACTION = {"mixste": (3, 8), "dstformer": (1, 5)}
MODELS = ("mixste", "dstformer")


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


def run_bench(preset: str, repeats: int, warmup: int, threads: int | None, batch: int = 1,
              device: str = "cpu") -> dict:
    import torch
    from tqdm import tqdm

    from h2ot.flops import model_gflops
    from h2ot.models import build_model

    if threads:
        torch.set_num_threads(threads)
    cfgs = _variants(preset)
    models = {name: build_model(cfg).eval() for name, cfg in cfgs.items()}
    flops = {name: model_gflops(models[name], cfgs[name]) for name in models}  # counted on the CPU
    dev = torch.device(device)
    models = {name: model.to(dev) for name, model in models.items()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # time the kernels, not their launch
    x = torch.randn(batch, cfgs["full"].frames, cfgs["full"].joints, cfgs["full"].in_channels, device=dev)
    times: dict[str, list[float]] = {name: [] for name in models}
    progress = tqdm(total=warmup + repeats, desc=f"bench {preset}", unit="rep", file=sys.stderr)
    with torch.inference_mode(), progress:
        for rep in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                sync()
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
            progress.update(1)
    cps = {name: batch / statistics.median(t) for name, t in times.items()}
    out = {"model": preset, "frames": cfgs["full"].frames, "batch": batch, "hot_schedule": cfgs["hot"].schedule,
           "h2ot_schedule": cfgs["h2ot"].schedule}
    for name in models:
        out[f"{name}_gflops"] = round(flops[name]["gflops_total"], 3)
        out[f"{name}_gflops_linear"] = round(flops[name]["gflops_linear"], 3)
    for name in models:
        out[f"{name}_clips_per_s"] = round(cps[name], 4)
    out["flops_ratio"] = round(flops["h2ot"]["gflops_total"] / flops["full"]["gflops_total"], 4)
    out["flops_ratio_linear"] = round(flops["h2ot"]["gflops_linear"] / flops["full"]["gflops_linear"], 4)
    out["hot_flops_ratio"] = round(flops["hot"]["gflops_total"] / flops["full"]["gflops_total"], 4)
    out["hot_flops_ratio_linear"] = round(flops["hot"]["gflops_linear"] / flops["full"]["gflops_linear"], 4)
    out["predicted_flops_ratio"] = round(
        flops["h2ot"]["gflops_predicted_total"] / flops["full"]["gflops_predicted_total"], 4
    )
    out["throughput_ratio"] = round(cps["h2ot"] / cps["full"], 4)
    out["hot_throughput_ratio"] = round(cps["hot"] / cps["full"], 4)
    out["speedup_efficiency"] = round(out["throughput_ratio"] * out["flops_ratio"], 4)
    out["repeats"] = repeats
    out["torch_threads"] = torch.get_num_threads()
    out["device"] = str(dev)
    return out


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h2ot bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    parser.add_argument("--model", choices=MODELS, default="mixste", help="backbone (default mixste)")
    parser.add_argument("--small", action="store_true", help="the CPU-size preset MODEL_small (fast)")
    parser.add_argument("--preset", default=None, help="model preset (default MODEL, or MODEL_small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=1, help="clips per forward (default 1: one video, online)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    preset = args.preset or (f"{args.model}_small" if args.small else args.model)
    repeats = args.repeats or (5 if preset in MODELS else 20)
    result = run_bench(preset, repeats, args.warmup, args.threads, args.batch, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
