"""`h2ot bench --reference-code DIR`: the official models are imported from a checkout at run time, built with
the checkout's own argument defaults, timed beside ours, and compared as ours / official. The checkout here is a
small stand-in written to tmp_path with the official layout and class names (never the real repository)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

ARGUMENTS = """
    import argparse


    def parse_args():
        parser = argparse.ArgumentParser()
        parser.add_argument('--channel', default=16, type=int)
        parser.add_argument('--d_hid', default=32, type=int)
        parser.add_argument('--frames', type=int, default=243)
        parser.add_argument('--token_num', default=81, type=int)
        parser.add_argument('--layer_index', default=3, type=int)
        parser.add_argument('--n_joints', type=int, default=17)
        parser.add_argument('--out_joints', type=int, default=17)
        parser.add_argument('--train', default=1, type=int)
        parser.add_argument('--test', action='store_true')
        args = parser.parse_args()
        if args.test:
            args.train = 0
        if args.train:
            raise RuntimeError('the training set-up ran: --test was not passed')
        return args
"""

MODEL = """
    import torch
    import torch.nn as nn
    {imports}


    class Model(nn.Module):
        def __init__(self, args):
            super().__init__()
            self.keep = {keep}
            self.embed = nn.Linear(2, args.channel)
            self.head = nn.Linear(args.channel, 3)

        def forward(self, x):
            b, f, n, c = x.shape
            h = self.embed(x)
            kept = h[:, torch.linspace(0, f - 1, self.keep).long()]
            h = h + kept.mean(dim=1, keepdim=True)
            return self.head(h).view(b, f, n, 3)
"""


def _checkout(root: Path, imports: str = "") -> Path:
    (root / "common").mkdir(parents=True)
    (root / "model" / "mixste").mkdir(parents=True)
    (root / "common" / "arguments.py").write_text(textwrap.dedent(ARGUMENTS))
    for name, keep in (("mixste.py", "args.frames"), ("hot_mixste.py", "args.token_num")):
        (root / "model" / "mixste" / name).write_text(textwrap.dedent(MODEL.format(imports=imports, keep=keep)))
    return root


def _bench(capsys, *argv: str, preset: str = "mixste_tiny") -> tuple[int, str, str]:
    from jobs.bench import main

    code = main(["--preset", preset, "--repeats", "2", "--threads", "1", "--json", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reference_models_are_timed_beside_ours_with_their_defaults(capsys, tmp_path) -> None:
    code, out, err = _bench(capsys, "--reference-code", str(_checkout(tmp_path / "HoT")))
    assert code == 0, err
    result = json.loads(out)
    # their defaults, at our window: 27 frames, HoT keeping the same share (81 of 243 -> 9 of 27)
    assert result["reference_args"] == {"frames": 27, "channel": 16, "d_hid": 32, "token_num": 9,
                                        "layer_index": 3, "n_joints": 17}
    assert result["official_mixste_clips_per_s"] > 0 and result["official_hot_clips_per_s"] > 0
    assert result["official_mixste_params_m"] == pytest.approx((2 * 16 + 16 + 16 * 3 + 3) / 1e6, abs=1e-3)
    for key in ("full_vs_official_mixste", "h2ot_vs_official_mixste", "h2ot_vs_official_hot", "hot_vs_official_hot"):
        assert result[key] > 0
    assert "full_vs_official_hot" not in result, "the full model is compared with the full official model only"
    assert result["best_h2ot"]["entry"] == "h2ot" and result["best_h2ot"]["vs_official_mixste"] > 0
    assert "official_mixste_throughput_ratio" not in result, "pruned/full ratios stay among our own models"


def test_a_model_of_ours_with_confidences_gives_theirs_the_same_windows_without(capsys, tmp_path) -> None:
    # dstformer_small: 81 frames of (x, y, confidence); the stand-in embeds (x, y) only, as theirs do
    code, out, err = _bench(capsys, "--reference-code", str(_checkout(tmp_path / "HoT")), preset="dstformer_small")
    assert code == 0, err
    result = json.loads(out)
    assert result["reference_args"]["frames"] == 81 and result["reference_args"]["token_num"] == 27
    assert result["h2ot_vs_official_hot"] > 0


def test_a_missing_package_of_theirs_is_one_line_naming_it(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "einops", None)  # import einops fails as if it were not installed
    root = _checkout(tmp_path / "HoT", imports="from einops import rearrange")
    code, _, err = _bench(capsys, "--reference-code", str(root))
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "needs the package 'einops'" in err and "mixste.py" in err


def test_a_folder_that_is_not_their_checkout_is_refused(capsys, tmp_path) -> None:
    code, _, err = _bench(capsys, "--reference-code", str(tmp_path))
    assert code == 2 and "not a checkout of the official HoT repository" in err and "model/mixste/mixste.py" in err
