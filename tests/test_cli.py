"""The `h2ot` dispatcher: help, unknown commands, and `h2ot bench` without Ray."""

from __future__ import annotations

import json
import subprocess
import sys

from jobs.cli import SUBCOMMANDS, main


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_command_is_a_clear_error(capsys) -> None:
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_every_subcommand_module_imports_without_ray() -> None:
    code = (
        "import importlib, sys\n"
        "from jobs.cli import SUBCOMMANDS\n"
        "for module, _ in SUBCOMMANDS.values():\n"
        "    importlib.import_module(module)\n"
        "heavy = [m for m in ('ray', 'mlflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_small_json_without_ray() -> None:
    code = (
        "import sys\n"
        "from jobs.cli import main\n"
        "rc = main(['bench', '--small', '--json', '--repeats', '2', '--warmup', '0'])\n"
        "assert 'ray' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("full_gflops", "hot_gflops", "h2ot_gflops", "full_gflops_linear", "flops_ratio", "hot_flops_ratio",
                "predicted_flops_ratio", "full_clips_per_s", "h2ot_clips_per_s", "throughput_ratio",
                "hot_throughput_ratio", "torch_threads"):
        assert key in result, key
    # On the 3-loop small MixSTE the HoT point (9 of 27 frames from loop 1) prunes more than H2OT's [[1, 13], [2, 9]].
    assert max(result["h2ot_gflops"], result["hot_gflops"]) < result["full_gflops"]
    assert abs(result["flops_ratio"] - result["predicted_flops_ratio"]) <= 0.05 * result["predicted_flops_ratio"]
