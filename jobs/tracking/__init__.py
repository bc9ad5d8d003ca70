"""Every MLflow write of the project, in one package: tracking URI, run names, experiments, the training run's
logger (here) and the parent and child runs of a Tune search (`jobs.tracking.search`).

The URI: `MLFLOW_TRACKING_URI` wins; otherwise an absolute sqlite file under the run folder
(`sqlite:////abs/RUN_DIR/mlflow.db`), because Ray workers run in other working directories. The driver checks
the URI (a tracking server that does not answer is one clear error within ~15 s, before anything trains) and
creates the run; the train loop's rank 0 reopens it by id and logs through `RunLogger`, which never lets a
tracking outage stop training: what cannot be logged is kept and sent again once the server is back, and the
end of the run says what came late or was lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jobs._common import UserError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RUN_ID_FILE = "mlflow_run.json"
TRIALS_FILE = "mlflow_trials.json"
CHECK_TIMEOUT_S = 15.0  # a tracking server that does not answer within this is an error before the run starts
CHECK_ATTEMPTS = 3
RETRY_INTERVAL_S = 30.0  # while the server is away, the logger tries it again at most this often
CLOSE_WAIT_S = 30.0  # at the end of a run, how long the logger keeps trying to send what it holds
# Rank 0 must not sit in MLflow's own HTTP retries (7 retries with exponential backoff: minutes) while the
# server is away; the logger keeps and resends instead. Values set by the user win.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PARAM_MAX_CHARS = 6000
BATCH = 100  # MLflow's log_batch takes at most 100 params per call


Keep = Callable[[Path], tuple[Path, "str | None"]]  # copies an artifact into a folder -> (file, artifact dir)


class TrackingUnavailable(UserError):
    """The tracking server named by the URI does not answer."""


# --------------------------------------------------------------------------------------------- names, URI
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(out_dir: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute sqlite path (RUN_DIR/mlflow.db, or ./mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(out_dir) if out_dir is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """For an http(s) URI, ask the server's `/health` (a few tries within `timeout_s`); TrackingUnavailable
    naming the URI when it never answers. Local stores (sqlite, files) need no server and pass."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    deadline, last = time.monotonic() + timeout_s, None
    for attempt in range(CHECK_ATTEMPTS):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=min(5.0, left)):  # noqa: S310
                log.info("MLflow tracking server %s answers", uri)
                return
        except urllib.error.HTTPError as e:  # it answered (e.g. 401 behind auth): it is there
            log.info("MLflow tracking server %s answers (HTTP %d on /health)", uri, e.code)
            return
        except (urllib.error.URLError, OSError) as e:
            last = getattr(e, "reason", e)
        if attempt < CHECK_ATTEMPTS - 1:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} does not answer ({last}); start it (or `h2ot cluster up`), point "
        f"MLFLOW_TRACKING_URI at a running server, or unset it to log to RUN_DIR/mlflow.db")


def git_revision() -> str:
    """The code's git revision (`+dirty` when the tree has changes), or "unknown" outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def schedule_tag(schedule: list[list[int]]) -> str:
    """`full` for an empty schedule, else `b1n27-b2n9` (block, kept tokens per stage)."""
    return "full" if not schedule else "-".join(f"b{b}n{n}" for b, n in schedule)


def run_name(cfg_dict: dict[str, Any], data_dir: str | Path) -> str:
    """What was trained: backbone, size, frames, schedule, data folder, seed (e.g. mixste-d64x4-f27-b1n9-h36m-s0)."""
    m = cfg_dict["model"]
    size = f"d{m['dim']}x{m['depth']}"
    return f"{m['backbone']}-{size}-f{m['frames']}-{schedule_tag(m['schedule'])}-{Path(data_dir).name}" \
           f"-s{cfg_dict['optim']['seed']}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.dim": "64", ...} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _metric_items(values: dict[str, Any], step: int, finite_only: bool = False) -> list[Any]:
    """The numbers of `values` as MLflow Metrics stamped now (others left out; NaN/inf too if `finite_only`)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()
            if isinstance(v, (int, float)) and (not finite_only or math.isfinite(float(v)))]


def _log_new_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Flattened `params` the run does not hold yet (a resumed run keeps its first values), 100 per call."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in flatten(params).items() if k not in existing]
    for i in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[i:i + BATCH])


# --------------------------------------------------------------------------------------------- a training run
def training_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` (created if absent), tagged as model training: MLflow 3's UI otherwise treats
    it as a GenAI one (its trace overview)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp_id


def runs_url(experiment_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI page of an experiment's runs. MLflow 3 opens an experiment on its GenAI overview unless the
    URL asks for the machine-learning workflow."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def log_summary_run(uri: str, experiment: str, name: str, tags: dict[str, str], metrics: dict[str, float],
                    summary: dict[str, Any], summary_name: str, files: list[Path]) -> str:
    """One finished run holding a job's summary (metrics, a JSON document, files); -> its id."""
    client = _client(uri)
    run = client.create_run(training_experiment(uri, experiment), run_name=name, tags=tags)
    run_id = run.info.run_id
    if metrics:
        client.log_batch(run_id, metrics=_metric_items(metrics, 0, finite_only=True))
    client.log_dict(run_id, summary, summary_name)
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def create_run(uri: str, experiment: str, name: str, out_dir: str | Path, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """Check the URI, then create (or, for a rerun of the same RUN_DIR, reuse) an MLflow run; returns its id."""
    check_tracking_uri(uri)
    client = _client(uri)
    marker = Path(out_dir) / RUN_ID_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("uri") == uri:
            try:
                client.get_run(saved["run_id"])
                return saved["run_id"]
            except Exception:  # noqa: BLE001 - a deleted run: make a new one
                log.warning("MLflow run %s of %s is gone; starting a new one", saved["run_id"], marker)
    exp_id = training_experiment(uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"uri": uri, "run_id": run.info.run_id, "experiment": experiment}))
    return run.info.run_id


def end_run(tracking: dict[str, str], failed: bool = False) -> None:
    """Mark the run {uri, run_id} FINISHED (or FAILED); a server that is away only costs a warning."""
    for k, v in FAIL_FAST_HTTP.items():
        os.environ.setdefault(k, v)
    try:
        _client(tracking["uri"]).set_terminated(tracking["run_id"], "FAILED" if failed else "FINISHED")
    except Exception as e:  # noqa: BLE001 - training is done and exported; the run's status is cosmetic
        log.warning("could not mark MLflow run %s as ended (%s): %s", tracking["run_id"], tracking["uri"], e)


class RunLogger:
    """Rank 0's handle on the run the driver created: params once, metrics per epoch, artifacts at the end.

    A call the tracking server cannot take (it is away, or restarting) does not raise: the write is kept, in
    order, and sent again on a later call once `retry_interval_s` has passed (artifacts, dicts and figures are
    first copied to a spool folder, since their sources may be gone by then). `close()` tries for a while longer,
    then says what was sent late and what was lost; train loops call it at the end.
    """

    def __init__(self, uri: str, run_id: str, *, client: Any = None, retry_interval_s: float = RETRY_INTERVAL_S):
        for k, v in FAIL_FAST_HTTP.items():
            os.environ.setdefault(k, v)
        self.uri, self.run_id = uri, run_id
        self.client = client if client is not None else _client(uri)
        self.retry_interval_s = retry_interval_s
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.late: list[str] = []
        self._next_try = 0.0
        self._spool: Path | None = None

    # the public API: what a train loop calls
    def log_params(self, params: dict[str, Any]) -> None:
        self._write("params", lambda: _log_new_params(self.client, self.run_id, params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        items = _metric_items(metrics, step)  # stamped now, even when sent later
        self._write(f"metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        def keep(folder: Path) -> tuple[Path, str | None]:
            return Path(shutil.copy(path, folder / Path(path).name)), artifact_path

        self._write(f"artifact {Path(path).name}",
                    lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), keep)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        def keep(folder: Path) -> tuple[Path, str | None]:
            (folder / Path(name).name).write_text(json.dumps(data, indent=1, default=str))
            return folder / Path(name).name, _artifact_dir(name)

        self._write(f"dict {name}", lambda: self.client.log_dict(self.run_id, data, name), keep)

    def log_figure(self, figure: Any, name: str) -> None:
        def keep(folder: Path) -> tuple[Path, str | None]:
            figure.savefig(folder / Path(name).name, bbox_inches="tight")
            return folder / Path(name).name, _artifact_dir(name)

        self._write(f"figure {name}", lambda: self.client.log_figure(self.run_id, figure, name), keep)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> dict[str, list[str]]:
        """Send what is held (trying for up to `wait_s`); -> {"late": [...], "lost": [...]}, also logged."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            self._next_try = 0.0
            self._flush()
            if not self.pending or time.monotonic() + 2.0 > deadline:
                break
            time.sleep(2.0)
        lost = [what for what, _ in self.pending]
        if self.late:
            log.warning("MLflow (%s): %d write(s) sent late, after the server came back: %s",
                        self.uri, len(self.late), ", ".join(self.late))
        if lost:
            log.error("MLflow (%s): %d write(s) LOST (the server did not come back within %.0f s): %s%s",
                      self.uri, len(lost), wait_s, ", ".join(lost),
                      f"; the files are kept in {self._spool}" if self._spool else "")
        elif self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        return {"late": list(self.late), "lost": lost}

    # the buffer
    def _write(self, what: str, send: Callable[[], None], keep: Keep | None = None) -> None:
        self._flush()
        if not self.pending:
            try:
                send()
                return
            except Exception as e:  # noqa: BLE001 - no tracking failure may stop training
                log.warning("MLflow (%s) did not take the %s (%s); keeping it and trying again every %.0f s; "
                            "training goes on", self.uri, what, _short(e), self.retry_interval_s)
                self._next_try = time.monotonic() + self.retry_interval_s
        self.pending.append((what, self._kept(what, send, keep) if keep else send))

    def _kept(self, what: str, send: Callable[[], None], keep: Keep) -> Callable[[], None]:
        """A copy in the spool folder (the source may be gone or changed by the time the server is back), and
        the resend that uploads that copy."""
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="h2ot-mlflow-spool-"))
        folder = self._spool / str(len(self.pending))
        folder.mkdir()
        try:
            local, artifact_dir = keep(folder)
        except Exception as e:  # noqa: BLE001 - no copy: resend from the source, if it is still there
            log.warning("could not keep a copy of the %s for later (%s)", what, e)
            return send
        return lambda: self.client.log_artifact(self.run_id, str(local), artifact_dir)

    def _flush(self) -> None:
        if not self.pending or time.monotonic() < self._next_try:
            return
        sent = 0
        while self.pending:
            what, send = self.pending[0]
            try:
                send()
            except Exception as e:  # noqa: BLE001 - still away: keep the rest, try again later
                log.debug("MLflow still unreachable (%s)", _short(e))
                self._next_try = time.monotonic() + self.retry_interval_s
                return
            self.pending.pop(0)
            self.late.append(what)
            sent += 1
        log.warning("MLflow (%s) is back: the %d write(s) held meanwhile are sent", self.uri, sent)


def _artifact_dir(name: str) -> str | None:
    """The artifact folder of an artifact file name (`plots/x.png` -> `plots`; `x.png` -> None)."""
    parent = str(Path(name).parent)
    return None if parent == "." else parent


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"
