"""The research tools in scripts/ run on tiny shards with their documented arguments."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from train_helpers import write_tiny_shards

from h2ot.checkpoint import save_checkpoint
from h2ot.config import config_from_dict
from h2ot.models import build_model

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n_train=32, n_test=8)


@pytest.fixture(scope="module")
def h2ot_checkpoint(tmp_path_factory) -> Path:
    cfg = config_from_dict({"kind": "model", "model": {"preset": "frameformer_small", "dim": 32, "heads": 2}}).model
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_model(cfg), cfg, {"manifest_hash": "test"})
    return path


def test_every_script_has_a_usage_line_and_a_readme_entry() -> None:
    readme = (SCRIPTS / "README.md").read_text()
    for path in sorted(SCRIPTS.glob("*.py")):
        assert "usage: python scripts/" + path.name in path.read_text(), path.name
        assert f"`{path.name}`" in readme, f"{path.name} is missing from scripts/README.md"


def test_context_probe_positions_prints_one_error_per_window_position(shards, h2ot_checkpoint, capsys) -> None:
    probe = load_script("context_probe")
    assert probe.main(["positions", "--data", str(shards), str(h2ot_checkpoint), "--max-windows", "8"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{h2ot_checkpoint}: all ") and len(line.split("by position ")[1].split()) == 27


def test_context_probe_kept_needs_shards_with_dropped_joints(shards, h2ot_checkpoint) -> None:
    probe = load_script("context_probe")
    with pytest.raises(SystemExit, match="no dropped joints"):
        probe.main(["kept", "--data", str(shards), str(h2ot_checkpoint)])


def test_recipe_probe_trains_and_evaluates(shards, capsys) -> None:
    probe = load_script("recipe_probe")
    args = ["--data", str(shards), "--config", "configs/h2ot_frameformer_small.yaml", "--steps", "2", "--batch", "2",
            "--every", "1", "--eval-windows", "4", "--set", "model.dim=32", "--set", "model.heads=2"]
    assert probe.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:3] for line in lines] == [["probe", "step", "1"], ["probe", "step", "2"]]
    assert probe.main(["--data", str(shards), "--config", "configs/absent.yaml"]) == 2


@pytest.mark.slow  # creates an MLflow database (~20 s on the loaded machine)
def test_results_table_reads_a_run_without_its_eval_file(tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    for key in load_script("results_table").KEYS:
        client.log_metric(run_id, key, 1.0, step=1)
    run_dir = tmp_path / "frameformer_small_s0"
    run_dir.mkdir()
    (run_dir / "mlflow_run.json").write_text(json.dumps({"uri": uri, "run_id": run_id}))
    assert load_script("results_table").main([str(run_dir)]) == 0
    assert "| frameformer_small_s0 | 1 | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="mlflow_run.json is missing"):
        load_script("results_table").main([str(tmp_path)])
