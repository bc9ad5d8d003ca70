"""`h2ot bench --reference-code DIR`: the official MixSTE and HoT-MixSTE beside ours, timed in the same loop.

DIR is the user's checkout of the official HoT repository (github.com/NationalGAILab/HoT, which also holds the
official MixSTE). Nothing of it is copied here: at run time its model files are imported from DIR by path, and
the models are built with the arguments its own argument parser gives by default (common/arguments.py: 512 wide,
MLP 1024, 8 loops, 243 frames, HoT keeps 81 frames before loop 3), with the frame and joint counts of our model.
Their models take (x, y) only; a model of ours with a confidence channel gets the same [B, T, J, 3] windows and
theirs the first two channels.

Their models run as shipped: eager PyTorch in fp32, always (the baseline of every ratio), and `torch.compile`
when --runtime lists compile; their DPC-kNN calls `torch.cdist`, which has no ONNX form, so there is no ONNX entry
for them. Ratios are ours / theirs in clips/s: `<our entry>_vs_official_mixste` for every entry of ours,
`<our pruned entry>_vs_official_hot` for the pruned ones, and `best_<variant>`: the runtime and precision of ours
that is fastest, with its ratios.
Their code needs `einops` (`pip install 'h2ot-ray[reference]'`) and `timm` (install it yourself, with the
torchvision built for the installed torch: pip may otherwise replace torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from jobs._common import UserError, one_line

ARGUMENTS_FILE = "common/arguments.py"
# the variant name of each official model -> its file in the checkout
MODEL_FILES = {"official_mixste": "model/mixste/mixste.py", "official_hot": "model/mixste/hot_mixste.py"}
OFFICIAL_RUNTIMES = ("eager", "compile")  # their code as shipped in PyTorch; no ONNX form (module docstring)
OFFICIAL_PREFIX = "official_"


def _check_checkout(root: Path) -> None:
    missing = [rel for rel in (ARGUMENTS_FILE, *MODEL_FILES.values()) if not (root / rel).is_file()]
    if missing:
        raise UserError(f"--reference-code {root}: not a checkout of the official HoT repository "
                        f"(missing {', '.join(missing)}); clone github.com/NationalGAILab/HoT and pass its folder")


def _import_file(root: Path, rel: str, name: str) -> ModuleType:
    """Import root/rel as the module `name`; a missing package or a broken import is one UserError line."""
    path = root / rel
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        package = (e.name or "?").split(".")[0]
        raise UserError(f"--reference-code: {rel} needs the package '{package}', which is not installed "
                        f"(pip install {package}, or pip install 'h2ot-ray[reference]')") from None
    except Exception as e:  # their code, any failure: one line naming the file
        hint = ""
        if "torchvision" in str(e):
            hint = " (torchvision does not match the installed torch: install the torchvision built for it)"
        raise UserError(f"--reference-code: importing {rel} failed: {type(e).__name__}: {one_line(e)}{hint}") from None
    return module


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def official_args(root: Path, frames: int, joints: int) -> argparse.Namespace:
    """Their parse_args() defaults (`--test` keeps their parser from its training set-up: a checkpoint folder and
    a log file), for `frames` frames and `joints` joints. At another window than their default (243) HoT keeps the
    same share of the frames (81 of 243)."""
    module = _import_file(root, ARGUMENTS_FILE, "h2ot_reference_arguments")
    with _argv(["main.py", "--test"]):
        try:
            args = module.parse_args()
        except SystemExit:
            raise UserError(f"--reference-code: {ARGUMENTS_FILE} does not accept --test "
                            "(another version of the repository?)") from None
    if frames != args.frames:
        args.token_num = max(1, round(args.token_num * frames / args.frames))
    args.frames, args.pad = frames, (frames - 1) // 2
    args.n_joints = args.out_joints = joints
    return args


def official_models(root: str | Path, frames: int, joints: int) -> tuple[dict, argparse.Namespace]:
    """{official_mixste, official_hot: model in eval mode} built from the checkout at `root`, and their args."""
    import torch

    root = Path(root).expanduser().resolve()
    _check_checkout(root)
    args = official_args(root, frames, joints)
    models = {}
    for name, rel in MODEL_FILES.items():
        module = _import_file(root, rel, f"h2ot_reference_{name}")
        if not hasattr(module, "Model"):
            raise UserError(f"--reference-code: {rel} has no class Model (another version of the repository?)")
        torch.manual_seed(0)
        try:
            models[name] = module.Model(args).eval()
        except Exception as e:
            raise UserError(f"--reference-code: building {rel}'s Model failed: {type(e).__name__}: "
                            f"{one_line(e)}") from None
    return models, args


def reference_entries(root: str | Path, cfg, runtimes: list[str], device) -> tuple[list, dict]:
    """Bench entries of the official models (fp32, official_runtimes) and the figures describing them (their
    args, parameters, linear GFLOPs)."""
    import torch

    from h2ot.flops import linear_flops
    from jobs.bench import Entry

    models, args = official_models(root, cfg.frames, cfg.joints)
    channels = args_channels(models)
    figures = {"reference_code": str(Path(root).expanduser().resolve()),
               "reference_args": {k: getattr(args, k) for k in ("frames", "channel", "d_hid", "token_num",
                                                                 "layer_index", "n_joints")}}
    entries = []
    for name, model in models.items():
        x = torch.zeros(1, cfg.frames, cfg.joints, channels)
        figures[f"{name}_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
        figures[f"{name}_gflops_linear"] = round(linear_flops(model, x) / 1e9, 3)
        model = model.to(device)
        for runtime in official_runtimes(runtimes):
            target = torch.compile(model) if runtime == "compile" else model
            entries.append(Entry(name, runtime, "fp32", lambda x, m=target, c=channels: m(x[..., :c]), target))
    return entries, figures


def official_runtimes(runtimes: list[str]) -> list[str]:
    """Eager always (their code as shipped: the baseline of every ratio), and each other runtime of theirs that
    --runtime lists."""
    return ["eager"] + [r for r in runtimes if r in OFFICIAL_RUNTIMES and r != "eager"]


def args_channels(models: dict) -> int:
    """The input channels their models embed (their Spatial_patch_to_embedding: Linear(2, dim))."""
    first = next(iter(models.values()))
    layer = getattr(first, "Spatial_patch_to_embedding", None)
    return getattr(layer, "in_features", 2)


def reference_ratios(entries: list, seconds: dict[str, float]) -> dict:
    """Ours / official in clips/s (module docstring): against their eager model, and against the same runtime of
    theirs where it ran; `best_<variant>` names our fastest entry of each variant."""
    official = {(e.variant, e.runtime): e.key for e in entries if e.variant.startswith(OFFICIAL_PREFIX)}
    ours = [e for e in entries if not e.variant.startswith(OFFICIAL_PREFIX)]
    out: dict = {}
    for entry in ours:
        against = ["official_mixste"] + (["official_hot"] if entry.variant != "full" else [])
        for name in against:
            if (name, "eager") in official:
                out[f"{entry.key}_vs_{name}"] = round(seconds[official[name, "eager"]] / seconds[entry.key], 4)
            if entry.runtime != "eager" and (name, entry.runtime) in official:
                theirs = official[name, entry.runtime]
                out[f"{entry.key}_vs_{name}_{entry.runtime}"] = round(seconds[theirs] / seconds[entry.key], 4)
    for variant in dict.fromkeys(e.variant for e in ours):
        fastest = min((e for e in ours if e.variant == variant), key=lambda e: seconds[e.key])
        best = {"entry": fastest.key, "runtime": fastest.runtime, "precision": fastest.precision}
        for name in ("official_mixste", "official_hot"):
            if f"{fastest.key}_vs_{name}" in out:
                best[f"vs_{name}"] = out[f"{fastest.key}_vs_{name}"]
        out[f"best_{variant}"] = best
    return out
