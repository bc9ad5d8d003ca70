"""`h2ot demo --quick` end to end (slow): shards, two Ray Train runs, evaluation, MLflow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.demo import format_paper_table, format_table, train_config
from jobs.settings import load_train_config
from jobs.tracking import runs_url

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("size", ["quick", "default"])
def test_demo_configs_share_the_budget_and_differ_in_schedule(size: str) -> None:
    full, h2ot = train_config([], size, 2, seed=1), train_config(None, size, 2, seed=1)
    assert full.model.schedule == [] and h2ot.model.schedule, "the H2OT variant prunes"
    assert full.optim == h2ot.optim and full.scaling == h2ot.scaling and full.optim.seed == 1
    assert {k: v for k, v in vars(full.model).items() if k != "schedule"} == \
        {k: v for k, v in vars(h2ot.model).items() if k != "schedule"}


def test_demo_trains_the_shipped_small_mixste() -> None:
    """The demo's two models are configs/mixste_small.yaml and configs/h2ot_mixste_small.yaml."""
    assert train_config([], "quick", 2).model == load_train_config(CONFIGS / "mixste_small.yaml").model
    assert train_config(None, "quick", 2).model == load_train_config(CONFIGS / "h2ot_mixste_small.yaml").model


def test_printed_link_opens_the_runs_page() -> None:
    assert runs_url("7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_paper_table_lists_full_hot_and_h2ot() -> None:
    bench = {"frames": 243, "batch": 1, "hot_schedule": [[3, 81]], "h2ot_schedule": [[2, 81], [4, 41], [6, 21]]}
    for name, lin, tot, cps in (("full", 277.2, 294.9, 0.3), ("hot", 167.5, 176.3, 0.6), ("h2ot", 114.8, 120.3, 0.9)):
        bench |= {f"{name}_gflops_linear": lin, f"{name}_gflops": tot, f"{name}_clips_per_s": cps}
    table = format_paper_table(bench)
    assert "277.2" in table and "[[3, 81]]" in table and "3.00x" in table and "batch 1" in table


def test_table_names_the_data_and_compares() -> None:
    rows = [{"model": "full", "schedule": [], "mpjpe_mm": 50.0, "p_mpjpe_mm": 40.0, "gflops": 0.2,
             "clips_per_s": 100.0},
            {"model": "h2ot", "schedule": [[1, 9]], "mpjpe_mm": 51.0, "p_mpjpe_mm": 41.0, "gflops": 0.1,
             "clips_per_s": 180.0}]
    table = format_table(rows, "SYNTHETIC motion")
    assert "SYNTHETIC" in table and "0.50x GFLOPs" in table and "+1.0 mm" in table


def test_missing_data_file_is_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--h36m", str(tmp_path / "nope.npz"),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SYNTHETIC" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    assert "?workflowType=machine_learning" in proc.stdout and "paper-size MixSTE" in proc.stdout
    stages = [line.split("]")[0] + "]" for line in proc.stdout.splitlines() if line.startswith("[")]
    assert stages == [f"[{i}/7]" for i in range(1, 8)], stages
    result = json.loads((out / "demo_result.json").read_text())
    assert [m["model"] for m in result["models"]] == ["full", "h2ot"]
    assert result["models"][1]["gflops"] < result["models"][0]["gflops"]
    for row in result["models"]:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("mpjpe_mm", "p_mpjpe_mm", "clips_per_s"))
    assert result["paper_size"]["h2ot_gflops_linear"] < result["paper_size"]["full_gflops_linear"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=result["mlflow_uri"])
    exp = client.get_experiment_by_name("h2ot-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"demo-full-synthetic-quick", "demo-h2ot-synthetic-quick"} <= names, names
    for run in runs:
        if run.info.run_name.startswith("demo-full") or run.info.run_name.startswith("demo-h2ot"):
            assert "val/mpjpe_mm" in run.data.metrics, run.info.run_name
    summary = client.get_run(result["summary_run_id"])
    assert summary.data.tags["synthetic"] == "true"
    assert "full/mpjpe_mm" in summary.data.metrics and "h2ot/mpjpe_mm" in summary.data.metrics
    assert "paper/full_clips_per_s" in summary.data.metrics
    # Re-running is safe: the shards are up to date and nothing fails.
    again = subprocess.run([sys.executable, "-m", "jobs.demo", "--quick", "--out", str(out)], env=env,
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "up to date" in again.stdout
