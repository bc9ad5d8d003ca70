"""`h2ot tune`: the pure parts (space checks, sampler, Pareto front, resources) fast; the tiny search end to end
(MLflow parent + a child per trial, Pareto artifacts) and its resume after the driver is killed are `slow`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from h2ot.config import ConfigError, ModelConfig, load_config
from h2ot.schedule import validate_schedule
from jobs.settings import load_train_config
from jobs.tune_search import (
    SearchSpace,
    TuneSettings,
    cheapest_within,
    draw_schedule,
    pareto_front,
    sample_trials,
    seed_groups,
    summarize,
    validate_space,
)

REPO = Path(__file__).resolve().parents[1]
TUNE_TINY = REPO / "configs" / "tune_tiny.yaml"
SMALL = ModelConfig(preset="mixste_small", backbone="mixste", frames=27, depth=4, dim=32, heads=4)


# ------------------------------------------------------------------------------------------- Pareto
TABLE = [  # (id, gflops, mpjpe): B dominates E; D is on the front; F ties C in x but is worse
    {"trial_id": "A", "gflops": 1.0, "mpjpe_mm": 50.0},
    {"trial_id": "B", "gflops": 2.0, "mpjpe_mm": 40.0},
    {"trial_id": "C", "gflops": 4.0, "mpjpe_mm": 30.0},
    {"trial_id": "D", "gflops": 6.0, "mpjpe_mm": 29.8},
    {"trial_id": "E", "gflops": 3.0, "mpjpe_mm": 45.0},
    {"trial_id": "F", "gflops": 4.0, "mpjpe_mm": 33.0},
    {"trial_id": "G", "gflops": 5.0, "mpjpe_mm": float("nan")},  # a failed trial is ignored
]


def test_pareto_front_on_a_hand_made_table() -> None:
    assert [r["trial_id"] for r in pareto_front(TABLE)] == ["A", "B", "C", "D"]
    assert pareto_front([]) == []
    # a single row, and equal rows: one of them
    assert [r["trial_id"] for r in pareto_front(TABLE[:1])] == ["A"]
    dup = [{"trial_id": "X", "gflops": 1.0, "mpjpe_mm": 5.0}, {"trial_id": "Y", "gflops": 1.0, "mpjpe_mm": 5.0}]
    assert [r["trial_id"] for r in pareto_front(dup)] == ["X"]


def test_cheapest_within_one_percent_of_the_best() -> None:
    # best 29.8; 1 % -> 30.098: C (30.0, 4 GFLOPs) is cheaper than D
    assert cheapest_within(TABLE)["trial_id"] == "C"
    assert cheapest_within(TABLE, tolerance=0.0)["trial_id"] == "D"
    assert cheapest_within(TABLE, tolerance=1.0)["trial_id"] == "A"  # 50 <= 59.6


def test_summary_names_hot_full_and_the_hierarchical_winners() -> None:
    rows = [
        {"trial_id": "full", "schedule": [], "gflops": 10.0, "mpjpe_mm": 30.0},
        {"trial_id": "hot", "schedule": [[1, 9]], "gflops": 6.0, "mpjpe_mm": 33.0},
        {"trial_id": "h2", "schedule": [[1, 13], [3, 5]], "gflops": 5.5, "mpjpe_mm": 32.0},  # beats HoT
        {"trial_id": "h3", "schedule": [[1, 18], [2, 9]], "gflops": 7.0, "mpjpe_mm": 31.0},  # costs more
        {"trial_id": "h4", "schedule": [[2, 9], [3, 3]], "gflops": 4.0, "mpjpe_mm": 40.0, "complete": False},
    ]
    s = summarize(rows, hot_schedule=[[1, 9]])
    assert s["hot"] == "hot" and s["full"] == "full" and s["best"] == "full"
    assert s["beats_hot"] == ["h2"]
    assert s["pareto"] == ["h2", "h3", "full"]  # h4 stopped early: not on the front
    assert s["complete"] == 4 and s["trials"] == 5


def test_seeds_replicate_each_trial_and_group_back() -> None:
    space = _space(include=[[[1, 9]], [[1, 13], [3, 5]]])
    trials = sample_trials(space, SMALL, TuneSettings(num_samples=2, seeds=[0, 1, 2]), base_lr=2e-3)
    assert [t["seed"] for t in trials] == [0, 1, 2, 0, 1, 2]
    assert trials[0]["schedule"] == trials[2]["schedule"] == [[1, 9]]
    rows = [{**t, "trial_id": str(i), "gflops": 1.0, "mpjpe_mm": v}
            for i, (t, v) in enumerate(zip(trials, [50.0, 52.0, 54.0, 49.0, 50.0, 51.0], strict=True))]
    groups = seed_groups(rows)
    assert [g["schedule"] for g in groups] == [[[1, 13], [3, 5]], [[1, 9]]]
    assert groups[0]["mpjpe_mm_mean"] == pytest.approx(50.0) and groups[0]["mpjpe_mm_std"] == pytest.approx(1.0)
    assert groups[1]["n"] == 3 and groups[1]["seeds"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="tune.seeds"):
        validate_space(space, SMALL, TuneSettings(seeds=[1, 1]))


# ------------------------------------------------------------------------------------------- space
def _space(**kw) -> SearchSpace:
    base = dict(stages=[1, 2, 3], tokens=[18, 13, 9, 5, 3], blocks=[1, 2, 3], tpm=["dpc_knn", "uniform"],
                trm=["cross_attention", "linear"], lr=[1e-3, 4e-3], include=[[], [[1, 9]]])
    return SearchSpace(**{**base, **kw})


def test_the_sampler_draws_only_valid_distinct_schedules_the_anchors_first() -> None:
    space = _space()
    trials = sample_trials(space, SMALL, TuneSettings(num_samples=24, seed=3), base_lr=2e-3)
    assert len(trials) == 24
    assert trials[0]["schedule"] == [] and trials[1]["schedule"] == [[1, 9]]
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 24
    for t in trials:
        validate_schedule(t["schedule"], SMALL.depth, SMALL.frames)
        assert 1e-3 <= t["lr"] <= 4e-3 and t["tpm"] in space.tpm and t["trm"] in space.trm
    assert sample_trials(space, SMALL, TuneSettings(num_samples=24, seed=3), 2e-3) == trials  # seeded
    rng = random.Random(0)
    for _ in range(500):
        validate_schedule(draw_schedule(space, SMALL.depth, rng), SMALL.depth, SMALL.frames)


@pytest.mark.parametrize("change, field", [
    (dict(tokens=[18, 27]), "space.tokens[1]"),  # not below the 27 frames
    (dict(tokens=[0, 9]), "space.tokens[0]"),
    (dict(blocks=[1, 4]), "space.blocks[1]"),  # depth 4: blocks 0..3
    (dict(stages=[1, 4]), "space.stages[1]"),  # 4 stages, 3 blocks
    (dict(stages=[3], tokens=[9, 5]), "space.stages[0]"),  # 3 stages, 2 token counts
    (dict(tpm=["dpc_knn", "nope"]), "space.tpm[1]"),
    (dict(trm=["bilinear"]), "space.trm[0]"),
    (dict(lr=[0.01, 0.001]), "space.lr"),
    (dict(include=[[[2, 9], [1, 5]]]), "space.include[0]"),  # blocks must increase
    (dict(include=[[[1, 9], [2, 13]]]), "space.include[0]"),  # tokens must decrease
])
def test_an_invalid_space_is_rejected_naming_the_field(change, field) -> None:
    with pytest.raises(ConfigError) as e:
        validate_space(_space(**change), SMALL, TuneSettings())
    assert str(e.value).startswith(field), str(e.value)


def test_too_small_a_space_or_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="tune.num_samples"):
        sample_trials(_space(stages=[1], tokens=[9], blocks=[1], tpm=["dpc_knn"], trm=["linear"], lr=[1e-3],
                             include=[]), SMALL, TuneSettings(num_samples=2), 1e-3)
    with pytest.raises(ConfigError, match="tune.scheduler"):
        validate_space(_space(), SMALL, TuneSettings(scheduler="hyperband"))
    with pytest.raises(ConfigError, match="tune.hot_schedule"):
        validate_space(_space(), SMALL, TuneSettings(hot_schedule=[[9, 9]]))


def test_cli_rejects_an_invalid_space_before_ray_starts(tmp_path, capsys) -> None:
    data = yaml.safe_load(TUNE_TINY.read_text())
    data["base"] = str(REPO / "configs" / "tiny.yaml")
    data["space"]["tokens"] = [30, 9]
    bad = tmp_path / "tune_bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    from jobs import tune

    rc = tune.main(["--config", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "space.tokens[0]" in err and "27 frames" in err, err
    assert not (tmp_path / "out").exists()


def test_tune_configs_load_with_their_base_and_dry_run(capsys) -> None:
    for name in ("tune_tiny.yaml", "tune_mixste_small_legacy.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.kind == "tune" and Path(cfg.base).is_file()
        assert cfg.model_config().frames == 27
    from jobs import tune

    assert tune.main(["--config", str(TUNE_TINY), "--data", "-", "--out", "-", "--dry-run"]) == 0
    trials = json.loads(capsys.readouterr().out)
    assert len(trials) == 4 and trials[0]["schedule"] == [] and trials[1]["schedule"] == [[1, 9]]


def test_resources_fit_the_cluster() -> None:
    from jobs.tune_trials import plan_resources

    base = load_train_config(REPO / "configs" / "mixste_small.yaml")  # 2 workers x 0.5 CPU
    plan = plan_resources(base, TuneSettings(), {"CPU": 2.0})
    assert plan["workers_per_trial"] == 2 and plan["max_concurrent_trials"] == 1  # 1 CPU left for Ray Data
    plan = plan_resources(base, TuneSettings(), {"CPU": 1.0})
    assert plan["workers_per_trial"] == 1 and plan["max_concurrent_trials"] == 1
    plan = plan_resources(base, TuneSettings(workers_per_trial=4), {"CPU": 33.0, "GPU": 8.0})
    assert plan["workers_per_trial"] == 4 and plan["use_gpu"] and plan["max_concurrent_trials"] == 2  # 8 GPUs / 4
    plan = plan_resources(base, TuneSettings(max_concurrent_trials=3), {"CPU": 64.0})
    assert plan["max_concurrent_trials"] == 3 and plan["workers_per_trial"] == 2


def test_progress_line_counts_ended_trials_and_names_the_best_so_far() -> None:
    from types import SimpleNamespace

    from jobs.tune_callbacks import TrialProgress

    def trial(tid, status, best, schedule, epoch=2):
        return SimpleNamespace(trial_id=tid, status=status, last_result={"epoch": epoch, "gflops": 0.01},
                               metric_analysis={"val/mpjpe_mm": {"min": best}} if best is not None else {},
                               config={"trial": {"schedule": schedule, "tpm": "dpc_knn", "trm": "linear", "lr": 2e-3}})

    a = trial("t0", "TERMINATED", 70.0, [])
    b = trial("t1", "RUNNING", 64.5, [[1, 9]])  # just completed: Tune may not have marked it yet
    c = trial("t2", "RUNNING", 60.0, [[1, 13], [2, 5]])  # still running, but the best epoch so far
    d = trial("t3", "PENDING", None, [[2, 9]])
    line = TrialProgress(total=4).line([a, b, c, d], b, "finished")
    assert "trial t1 finished (b1n9 dpc_knn linear lr 0.002 val/mpjpe_mm 64.50" in line, line
    assert "2/4 trials ended" in line, line
    assert line.endswith("best so far: t2 (b1n13-b2n5 dpc_knn linear lr 0.002 val/mpjpe_mm 60.00 at 0.0100 GFLOPs "
                         "after 2 epoch(s))"), line
    assert "best so far" not in TrialProgress(total=1).line([d], d, "FAILED")


def test_tune_module_imports_without_ray() -> None:
    code = "import sys, jobs.tune, jobs.tune_search; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tune_env(tmp_path_factory):
    """Environment of the h2ot tune subprocesses: own HOME and Ray temp dir, token auth off explicitly."""
    from train_helpers import write_tiny_shards

    root = tmp_path_factory.mktemp("tune")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    ray_tmp = Path("/tmp") / f"h2ot-tt-{os.getpid()}"  # Ray's socket paths must stay short
    env.update(HOME=str(root / "home"), RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp),
               RAY_TRAIN_ENABLE_PRINT_PATCH="0", TUNE_GLOBAL_CHECKPOINT_S="2")  # experiment state saved often
    (root / "home").mkdir()
    shards = write_tiny_shards(root / "shards", frames=27, n_train=256, n_test=48)
    return {"root": root, "env": env, "shards": shards}


def _tune_cmd(env: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--config", str(TUNE_TINY), "--data", str(env["shards"]),
            "--out", str(out), "--num-cpus", "2", *extra]


def _children(out: Path) -> tuple[dict, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {"client": client, "parent": parent}, children


@pytest.mark.slow
def test_tiny_search_logs_a_parent_and_a_child_per_trial(tune_env) -> None:
    out = tune_env["root"] / "search"
    proc = subprocess.run(_tune_cmd(tune_env, out, "--json"), env=tune_env["env"], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 4 and summary["complete"] >= 1 and summary["pareto"]  # ASHA may stop the rest
    assert summary["cheapest_within_1pct"] in {r["trial_id"] for r in json.loads((out / "pareto.json").read_text())
                                                ["trials"]}
    for f in ("pareto.csv", "pareto.json", "pareto.png", "summary.json"):
        assert (out / f).stat().st_size > 0
    h, children = _children(out)
    assert len(children) == 4
    for run in children:
        hist = h["client"].get_metric_history(run.info.run_id, "val/mpjpe_mm")
        assert 1 <= len(hist) <= 2 and all(0 < m.value < 1e4 for m in hist)
        assert h["client"].get_metric_history(run.info.run_id, "gflops")
        assert run.data.params["trial.schedule"] and run.info.status == "FINISHED"
        assert run.data.tags["status"] in ("complete", "stopped")
        assert run.data.metrics["final/gflops"] > 0
    artifacts = {a.path for a in h["client"].list_artifacts(h["parent"])}
    assert {"pareto.csv", "pareto.json", "pareto.png", "summary.json"} <= artifacts
    # the full model costs the most; the measured GFLOPs match the analytic prediction
    rows = json.loads((out / "pareto.json").read_text())["trials"]
    full = next(r for r in rows if r["schedule"] == [])
    assert full["gflops"] == max(r["gflops"] for r in rows)
    for r in rows:
        assert r["gflops"] == pytest.approx(r["gflops_predicted"], rel=0.02)


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_finished_trials(tune_env) -> None:
    out = tune_env["root"] / "resume"
    starts = out / "trial_starts"
    proc = subprocess.Popen(_tune_cmd(tune_env, out, "--set", "tune.max_concurrent_trials=1",
                                      "--set", "tune.scheduler=none"),
                            env=tune_env["env"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(out.parent / "resume-first.err", "w"), start_new_session=True)  # noqa: SIM115
    try:  # kill the driver (and its local Ray) once the first trial has finished and the second has started
        deadline = time.time() + 1200  # a loaded 2-core host: minutes per tiny trial
        while time.time() < deadline and not (starts.is_dir() and len(list(starts.iterdir())) >= 2):
            assert proc.poll() is None, ("the search ended before it could be interrupted: "
                                         + (out.parent / "resume-first.err").read_text()[-3000:])
            time.sleep(1)
        assert len(list(starts.iterdir())) >= 2, "no second trial started within 20 minutes"
        time.sleep(10)  # Tune has saved the experiment state with the first trial finished
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_run = {p.name: p.read_text().count("\n") for p in starts.iterdir()}
    time.sleep(2)
    proc2 = subprocess.run(_tune_cmd(tune_env, out, "--json"), env=tune_env["env"], cwd=REPO, capture_output=True,
                           text=True, timeout=1800)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "resuming the search" in proc2.stderr
    counts = {p.name: p.read_text().count("\n") for p in starts.iterdir()}
    assert len(counts) == 4
    finished_first = sorted(first_run)[0]  # trial ids are numbered in start order: ..._00000 ran to the end
    assert counts[finished_first] == 1, counts  # not rerun
    assert sum(counts.values()) <= 5  # at most the interrupted trial started twice
    summary = json.loads(proc2.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 4 and summary["complete"] == 4  # scheduler=none: every trial ran every epoch
    _, children = _children(out)
    assert len(children) == 4
