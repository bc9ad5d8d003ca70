"""MLflow tracking that a server outage cannot stop: the URI is checked when a run starts (one clear error
within ~15 s), and `RunLogger` keeps what the server could not take and sends it once the server is back, then
says what came late or was lost. Fast: a fake client that fails on demand. Slow: a real `mlflow server` on
127.0.0.1 stopped and started during a run.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.tracking import RunLogger, TrackingUnavailable, check_tracking_uri, create_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


class FakeClient:
    """MlflowClient's calls that RunLogger makes; raises ConnectionError while `down`."""

    def __init__(self) -> None:
        self.down, self.calls, self.attempts, self.params = False, [], 0, {}

    def _call(self, *record) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("connection refused")
        self.calls.append(record)

    def get_run(self, run_id):
        self._call("get_run")
        return SimpleNamespace(data=SimpleNamespace(params=dict(self.params)))

    def log_batch(self, run_id, metrics=(), params=()):
        self._call("log_batch", [(m.key, m.value, m.step, m.timestamp) for m in metrics], [p.key for p in params])
        self.params.update({p.key: p.value for p in params})

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call("log_artifact", Path(path).name, artifact_path, Path(path).read_bytes())

    def log_dict(self, run_id, data, name):
        self._call("log_dict", name, data)

    def log_figure(self, run_id, figure, name):
        self._call("log_figure", name)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_writes_during_an_outage_are_kept_in_order_and_sent_when_the_server_is_back(tmp_path: Path) -> None:
    client = FakeClient()
    logger = RunLogger("http://fake", "run1", client=client, retry_interval_s=0)
    logger.log_params({"model": {"dim": 32}, "lr": 0.001})
    assert client.calls[-1] == ("log_batch", [], ["model.dim", "lr"])
    client.down = True
    t0 = time.time()
    logger.log_metrics({"val/mpjpe_mm": 70.0, "note": "x"}, step=1)  # none of these raises
    logger.log_dict({"Walking": 50.0}, "per_action.json")
    best = tmp_path / "best.pt"
    best.write_bytes(b"weights")
    logger.log_artifact(best, "model")
    best.unlink()  # gone before the server is back: the logger kept a copy
    fig = _figure()
    logger.log_figure(fig, "plots/skeleton.png")
    assert [what for what, _ in logger.pending] == ["metrics of step 1", "dict per_action.json",
                                                    "artifact best.pt", "figure plots/skeleton.png"]
    client.down = False
    sent_before = len(client.calls)
    logger.log_metrics({"val/mpjpe_mm": 60.0}, step=2)
    late = client.calls[sent_before:]
    assert late[0][0] == "log_batch" and late[0][1][0][:3] == ("val/mpjpe_mm", 70.0, 1)
    assert t0 * 1000 - 1 <= late[0][1][0][3] <= time.time() * 1000  # stamped when it was logged
    assert late[1][:3] == ("log_artifact", "per_action.json", None)
    assert json.loads(late[1][3]) == {"Walking": 50.0}
    assert late[2] == ("log_artifact", "best.pt", "model", b"weights")
    assert late[3][:3] == ("log_artifact", "skeleton.png", "plots") and late[3][3][:4] == b"\x89PNG"
    assert late[4][1][0][:3] == ("val/mpjpe_mm", 60.0, 2)
    report = logger.close(wait_s=0)
    assert report == {"late": ["metrics of step 1", "dict per_action.json", "artifact best.pt",
                               "figure plots/skeleton.png"], "lost": []}


def test_what_never_got_through_is_reported_lost_and_the_server_is_not_hammered(caplog) -> None:
    client = FakeClient()
    logger = RunLogger("http://fake", "run1", client=client, retry_interval_s=3600)
    client.down = True
    logger.log_metrics({"a": 1.0}, step=1)
    attempts = client.attempts
    for step in range(2, 6):
        logger.log_metrics({"a": float(step)}, step=step)
    assert client.attempts == attempts  # within the retry interval nothing is tried
    assert len(logger.pending) == 5
    report = logger.close(wait_s=0)
    assert report["late"] == [] and report["lost"] == [f"metrics of step {s}" for s in range(1, 6)]
    assert "LOST" in caplog.text and "http://fake" in caplog.text


def test_an_unreachable_tracking_server_is_one_clear_error_within_15_s() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"tracking server {uri} does not answer.*MLFLOW_TRACKING_URI"):
        check_tracking_uri(uri)
    assert time.monotonic() - t0 < 15
    check_tracking_uri("sqlite:////tmp/nowhere/mlflow.db")  # a local store needs no server


def test_a_server_that_answers_health_passes() -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_uri(f"http://127.0.0.1:{server.server_port}", timeout_s=5)
    finally:
        server.shutdown()


def test_h2ot_train_with_its_tracking_server_down_stops_at_once_with_one_line(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    from train_helpers import write_tiny_shards

    import jobs.evaluation  # noqa: F401 - imported before the clock starts: on a loaded machine torch takes long
    from jobs import train

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shards = write_tiny_shards(tmp_path / "shards", frames=27, n_train=8, n_test=4)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    t0 = time.monotonic()
    rc = train.main(["--config", str(config), "--data", str(shards), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: MLflow tracking server {uri}"), err
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "run" / "ray").exists()  # nothing trained


# ------------------------------------------------------------------------------------------- a real server
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and artifacts under `root`; stop() and start() again."""

    def __init__(self, root: Path):
        self.root, self.port = root, _closed_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                check_tracking_uri(self.uri, timeout_s=2)
                return
            except TrackingUnavailable:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
        raise AssertionError(f"mlflow server did not start within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the server and its uvicorn worker: this test's own process group
            self.proc.wait(timeout=60)


@pytest.mark.slow
def test_a_run_survives_its_tracking_server_going_away_and_coming_back(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path)
    server.start()
    try:
        run_id = create_run(server.uri, "h2ot-outage", "outage", tmp_path / "run")
        logger = RunLogger(server.uri, run_id, retry_interval_s=1)
        logger.log_params({"model": {"dim": 32}})
        logger.log_metrics({"val/mpjpe_mm": 70.0}, step=1)
        server.stop()
        t0 = time.monotonic()
        logger.log_metrics({"val/mpjpe_mm": 65.0}, step=2)  # "training" goes on while the server is away
        logger.log_dict({"Walking": 50.0}, "per_action.json")
        best = tmp_path / "best.pt"
        best.write_bytes(b"weights")
        logger.log_artifact(best, "model")
        assert time.monotonic() - t0 < 60 and len(logger.pending) == 3
        with pytest.raises(TrackingUnavailable):  # a new run would not start now
            create_run(server.uri, "h2ot-outage", "another", tmp_path / "run2")
        server.start()
        time.sleep(1.1)  # the retry interval
        logger.log_metrics({"val/mpjpe_mm": 60.0}, step=3)
        report = logger.close(wait_s=30)
        assert report == {"late": ["metrics of step 2", "dict per_action.json", "artifact best.pt"], "lost": []}
        client = MlflowClient(server.uri)
        history = client.get_metric_history(run_id, "val/mpjpe_mm")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 70.0), (2, 65.0),
                                                                                     (3, 60.0)]
        assert client.get_run(run_id).data.params["model.dim"] == "32"
        artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(
            run_id, "model")}
        assert {"per_action.json", "model/best.pt"} <= artifacts
    finally:
        server.stop()


def test_experiments_are_tagged_as_model_training_and_summary_runs_finish(tmp_path):
    """Every experiment the project creates opens on its runs in MLflow 3's UI (tagged as model training), and a
    job's summary run holds its finite metrics, its JSON document and its files."""
    import mlflow

    from jobs.tracking import log_summary_run, training_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = training_experiment(uri, "h2ot-test")
    assert training_experiment(uri, "h2ot-test") == exp_id
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    table = tmp_path / "table.txt"
    table.write_text("model mpjpe\n")
    run_id = log_summary_run(uri, "h2ot-test", "summary", {"data": "synthetic"},
                             {"full/mpjpe_mm": 40.5, "h2ot/mpjpe_mm": float("nan")}, {"rows": [1]}, "summary.json",
                             [table])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["data"] == "synthetic"
    assert run.data.metrics == {"full/mpjpe_mm": 40.5}  # NaN left out
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["summary.json", "table.txt"]
