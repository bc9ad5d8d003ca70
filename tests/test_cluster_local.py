"""Fast checks of `h2ot cluster`: state file, stopping exactly what was started, port-taken errors, a private
state folder and token."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import ClusterError, procs
from cluster import local as cluster
from cluster.local import state as cluster_state
from jobs import cluster as cluster_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(tmp_path: Path, **kw) -> cluster.ClusterState:
    base = dict(
        id="t" + os.urandom(3).hex(),
        mode="host",
        state_dir=str(tmp_path),
        cpus_per_node=1.0,
        gcs_port=1,
        dashboard_port=2,
        mlflow_port=3,
    )
    return cluster.ClusterState(**{**base, **kw})


def _spawn(marker: str | None, script: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(cluster.MARKER, None)
    if marker:
        env[cluster.MARKER] = marker
    return subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)


def test_state_round_trip(tmp_path: Path) -> None:
    state = _state(tmp_path, nodes=[cluster.NodeState("head", "10.0.0.2", netns="ns-a", pid=12, start_ticks=34)])
    state.mlflow_host = "127.0.0.1"
    cluster.save_state(state)
    back = cluster.load_state(tmp_path)
    assert back == state
    assert back.head.name == "head" and back.mlflow_url == "http://127.0.0.1:3"
    assert json.loads((tmp_path / "state.json").read_text())["nodes"][0]["netns"] == "ns-a"


def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ClusterError, match="unreadable cluster state"):
        cluster.load_state(tmp_path)


def test_down_after_a_crash_stops_exactly_the_marked_processes(tmp_path: Path) -> None:
    """A state left by a crashed `up`: its node (and the node's own child) stop; a stranger keeps running."""
    state = _state(tmp_path)
    # A "node" that started a child of its own and whose parent went away (as after a crash of `up`).
    node = _spawn(
        state.id,
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)",
    )
    stranger = _spawn(None, "import time; time.sleep(60)")
    try:
        state.nodes = [cluster.NodeState("head", None, pid=node.pid, start_ticks=procs.start_ticks(node.pid))]
        cluster.save_state(state)
        deadline = time.monotonic() + 10
        while len(cluster.marked_pids(state.id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cluster.marked_pids(state.id)) == 2
        assert cluster.down(tmp_path) == 2
        assert cluster.marked_pids(state.id) == []
        assert stranger.poll() is None, "a process that `up` did not start was stopped"
        assert not (tmp_path / "state.json").exists()
    finally:
        for p in (node, stranger):
            p.kill()
            p.wait()


def test_pid_reuse_guard(tmp_path: Path) -> None:
    me = os.getpid()
    ticks = procs.start_ticks(me)
    assert procs.is_alive(me, ticks)
    assert not procs.is_alive(me, ticks + 1)  # same pid, another start time: not ours
    assert not procs.is_alive(None, None)


def test_port_taken_names_port_and_option() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=rf"port {port} on 127.0.0.1 is taken \(MLflow server.*--mlflow-port"):
            cluster.check_port_free("127.0.0.1", port, "MLflow server", "--mlflow-port")
    cluster.check_port_free("127.0.0.1", port, "MLflow server", "--mlflow-port")  # free again


def test_up_with_a_taken_port_starts_nothing_and_leaves_no_state(tmp_path: Path, capsys) -> None:
    temp_dirs = set(Path("/tmp").glob("h2ot-ray-*"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        argv = [
            "up",
            "--state-dir",
            str(tmp_path),
            "--no-netns",
            "--gcs-port",
            str(_free_port()),
            "--dashboard-port",
            str(_free_port()),
            "--mlflow-port",
            str(port),
        ]
        assert cluster_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "--mlflow-port" in err
    assert not (tmp_path / "state.json").exists()
    assert set(Path("/tmp").glob("h2ot-ray-*")) <= temp_dirs  # Ray's temp dir was removed again


def test_state_dir_is_private_and_the_token_is_0600_from_its_creation(tmp_path: Path, monkeypatch, capsys) -> None:
    """Under a umask that lets everyone read, `up` makes the state folder 0700 and creates the token file 0600
    (checked on the open file, before a byte is written), replacing a readable one left from before."""
    modes = []
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        modes.append(os.fstat(fd).st_mode & 0o777)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(cluster_state.os, "fdopen", fdopen)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o777)
    (state_dir / "auth_token").write_text("old")
    (state_dir / "auth_token").chmod(0o644)
    old_umask = os.umask(0)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            argv = ["up", "--state-dir", str(state_dir), "--no-netns", "--gcs-port", str(_free_port()),
                    "--dashboard-port", str(_free_port()), "--mlflow-port", str(s.getsockname()[1])]
            assert cluster_cli.main(argv) == 2  # the port is taken: after the token was written
    finally:
        os.umask(old_umask)
    assert "--mlflow-port" in capsys.readouterr().err
    assert modes == [0o600]
    token = state_dir / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    assert state_dir.stat().st_mode & 0o777 == 0o700
    assert (state_dir / "logs").stat().st_mode & 0o777 == 0o700


def test_status_and_down_without_a_cluster(tmp_path: Path, capsys) -> None:
    assert cluster_cli.main(["status", "--state-dir", str(tmp_path)]) == 1
    assert cluster_cli.main(["down", "--state-dir", str(tmp_path)]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_describe_prints_addresses_and_commands(tmp_path: Path) -> None:
    state = _state(tmp_path, mode="netns", nodes=[cluster.NodeState("head", "10.213.7.2", netns="h2ot-x-head")])
    state.dashboard_host, state.mlflow_host, state.token_path = "10.213.7.2", "10.213.7.1", str(tmp_path / "t")
    text = cluster.describe(state)
    assert "ray job submit --address http://10.213.7.2:2 --working-dir ." in text
    assert '"MLFLOW_TRACKING_URI": "http://10.213.7.1:3"' in text
    assert f"source {tmp_path / 'env.sh'}" in text
    env = cluster.write_env_file(state).read_text()
    assert "RAY_AUTH_MODE=token" in env and "RAY_ADDRESS=http://10.213.7.2:2" in env


def test_auth_headers_carry_the_cluster_token(tmp_path: Path) -> None:
    state = _state(tmp_path)
    assert state.auth_headers() == {}  # no token: auth off
    (tmp_path / "t").write_text("abc123\n")
    state.token_path = str(tmp_path / "t")
    assert state.auth_headers() == {"Authorization": "Bearer abc123"}


def test_cli_lists_cluster() -> None:
    from jobs.cli import SUBCOMMANDS

    assert SUBCOMMANDS["cluster"][0] == "jobs.cluster"


class FakeRay:
    """The part of the `ray` module that `cluster.ray_session.connect` uses; `init` fails `fail` times."""

    def __init__(self, fail: int = 0, message: str = "The raylet timed out during startup") -> None:
        self.initialized, self.fail, self.message, self.inits = False, fail, message, []

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.fail:
            raise RuntimeError(self.message)
        self.initialized = True

    def shutdown(self) -> None:
        self.initialized = False


def test_connect_picks_the_address_and_retries_only_a_startup_timeout(monkeypatch) -> None:
    from cluster import ray_session

    stopped = []
    monkeypatch.setattr(ray_session, "stop_descendants", lambda: stopped.append(True))
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_session.connect(num_cpus=2, env_vars={"A": "1"}, dashboard=False) is True
    assert fake.inits == [{"address": "10.0.0.5:6379", "log_to_driver": True, "configure_logging": True,
                           "runtime_env": {"env_vars": {"A": "1"}}}]  # a running cluster: no num_cpus
    assert ray_session.connect() is False  # already connected: nothing to shut down

    monkeypatch.delenv("RAY_ADDRESS")
    fake = FakeRay(fail=2)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert ray_session.connect(num_cpus=1, start_attempts=3) is True
    assert [i["address"] for i in fake.inits] == ["local"] * 3 and fake.inits[0]["num_cpus"] == 1
    assert len(stopped) == 2 and fake.inits[0]["runtime_env"] is None

    fake = FakeRay(fail=1)  # one attempt: the error is raised, nothing of the caller's is stopped
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(RuntimeError, match="timed out"):
        ray_session.connect()
    assert len(stopped) == 2

    fake = FakeRay(fail=1, message="bad num_cpus")  # another error is not retried
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(RuntimeError, match="bad num_cpus"):
        ray_session.connect(start_attempts=3)
    assert len(fake.inits) == 1


def test_connect_to_a_cluster_that_refuses_is_one_line_naming_the_address_and_the_token(monkeypatch) -> None:
    from cluster import ray_session

    class Refused(FakeRay):
        def init(self, **kwargs) -> None:
            raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setitem(sys.modules, "ray", Refused())
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(ClusterError, match=r"10\.0\.0\.5:6379.*RAY_AUTH_TOKEN_PATH"):
        ray_session.connect()


def _node_cmds(state: cluster.ClusterState) -> dict[str, list[str]]:
    from cluster.local.nodes import _ray_cmd

    return {n.name: _ray_cmd(state, n, head=n.name == "head") for n in state.nodes}


def test_head_cpus_zero_gives_the_head_no_task_cpus_and_workers_theirs(tmp_path: Path) -> None:
    nodes = [cluster.NodeState("head", "10.0.0.2", netns="ns-head"), cluster.NodeState("w1", "10.0.0.3", netns="ns-w1")]
    cmds = _node_cmds(_state(tmp_path, cpus_per_node=1.0, head_cpus=0.0, nodes=nodes, ray_temp_dir="/tmp/h2ot-ray-x"))
    assert "--num-cpus=0" in cmds["head"] and "--head" in cmds["head"]
    assert "--num-cpus=1" in cmds["w1"] and "--address=10.0.0.2:1" in cmds["w1"]
    assert cmds["head"][:4] == ["ip", "netns", "exec", "ns-head"]
    assert "--temp-dir=/tmp/h2ot-ray-x/head" in cmds["head"] and "--temp-dir=/tmp/h2ot-ray-x/w1" in cmds["w1"]
    # the default (no --head-cpus) keeps today's behaviour: the head has --cpus-per-node like every worker
    cmds = _node_cmds(_state(tmp_path, cpus_per_node=3.0, nodes=nodes))
    assert "--num-cpus=3" in cmds["head"] and "--num-cpus=3" in cmds["w1"]
    assert [a for a in cmds["head"] if a.startswith("--num-cpus")] == ["--num-cpus=3"]


def test_head_cpus_round_trips_and_describe_shows_each_nodes_cpus(tmp_path: Path) -> None:
    state = _state(tmp_path, mode="netns", head_cpus=0.0, nodes=[cluster.NodeState("head", "10.0.0.2"),
                                                                  cluster.NodeState("w1", "10.0.0.3")])
    state.dashboard_host, state.mlflow_host = "10.0.0.2", "10.0.0.1"
    cluster.save_state(state)
    assert cluster.load_state(tmp_path).head_num_cpus == 0.0
    lines = cluster.describe(state).splitlines()
    assert "0 CPU" in lines[1] and "head" in lines[1] and "1 CPU" in lines[2]
    old = json.loads((tmp_path / "state.json").read_text())
    del old["head_cpus"]  # a state file written before the option: the head had cpus_per_node
    (tmp_path / "state.json").write_text(json.dumps(old))
    assert cluster.load_state(tmp_path).head_num_cpus == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--head-cpus", "0", "--workers", "0"], "without CPUs for tasks"),
    (["--head-cpus", "-1"], "CPUs must be >= 0"),
    (["--gcs-port", "16391"], "--gcs-port 16391 lies in the ports Ray gives its workers"),
    (["--dashboard-port", "10002"], "--dashboard-port 10002 lies in the ports"),
])
def test_up_refuses_a_cluster_that_could_not_work_before_starting_anything(tmp_path: Path, capsys, argv,
                                                                          message) -> None:
    state_dir = tmp_path / "state"
    assert cluster_cli.main(["up", "--state-dir", str(state_dir), "--no-netns", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not state_dir.exists()


def test_drivers_run_on_the_head_with_the_clusters_address_token_and_marker(tmp_path: Path) -> None:
    state = _state(tmp_path, mode="netns", gcs_port=26391, token_path=str(tmp_path / "t"),
                   nodes=[cluster.NodeState("head", "10.0.0.2", netns="h2ot-x-head")])
    state.mlflow_host = "10.0.0.1"
    argv = ["python", "-m", "jobs.preprocess", "--out", "x"]
    assert cluster.driver_command(state, argv) == ["ip", "netns", "exec", "h2ot-x-head", *argv]
    env = cluster.driver_env(state, base={"PATH": "/usr/bin", "RAY_ADDRESS": "elsewhere:1", "KEEP": "1"})
    assert env["RAY_ADDRESS"] == "10.0.0.2:26391" and env[cluster.MARKER] == state.id and env["KEEP"] == "1"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "t")
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:3"
    assert env["PATH"].startswith(str(Path(sys.executable).parent))
    host = _state(tmp_path, nodes=[cluster.NodeState("head", "192.0.2.2")])
    assert cluster.driver_command(host, argv) == argv  # host mode: the nodes share the host's network


def test_exec_without_a_running_cluster_or_a_command_says_what_to_do(tmp_path: Path, capsys) -> None:
    assert cluster_cli.main(["exec", "--state-dir", str(tmp_path), "--", "true"]) == 2
    assert "no running cluster" in capsys.readouterr().err
    assert cluster_cli.main(["exec", "--state-dir", str(tmp_path)]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_exec_runs_the_command_with_the_driver_environment(tmp_path: Path, capsys) -> None:
    state = _state(tmp_path, gcs_port=26391, ready=True, token_path=str(tmp_path / "t"),
                   nodes=[cluster.NodeState("head", "127.0.0.1")])
    cluster.save_state(state)
    out = tmp_path / "env.txt"
    script = (f"import os; open({str(out)!r}, 'w')"
              f".write(os.environ['RAY_ADDRESS'] + ' ' + os.environ['{cluster.MARKER}'])")
    assert cluster_cli.main(["exec", "--state-dir", str(tmp_path), "--", sys.executable, "-c", script]) == 0
    assert out.read_text() == f"127.0.0.1:26391 {state.id}"
    assert cluster_cli.main(["exec", "--state-dir", str(tmp_path), "--", sys.executable, "-c", "exit(3)"]) == 3


def test_a_node_that_died_during_startup_fails_at_once_with_its_log(tmp_path: Path) -> None:
    from cluster.local.nodes import _wait

    log_file = tmp_path / "ray-head.log"
    log_file.write_text("starting\nValueError: Ray component worker_ports is trying to use a port number 16391\n")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"(?s)the Ray head exited during startup.*worker_ports"):
        _wait("the Ray head", lambda: False, 60, str(log_file), died=lambda: True)
    assert time.monotonic() - t0 < 5


def test_free_subnet_skips_the_ranges_in_use(monkeypatch) -> None:
    from cluster.local import network

    taken = {"10.213.7.0/24": "h2ot1", "10.213.8.0/24": "eth9"}
    monkeypatch.setattr(network, "subnet_in_use", lambda subnet: taken.get(subnet))
    assert network.free_subnet() == "10.213.9.0/24"
    with pytest.raises(ClusterError, match="no free 10.213.x.0/24"):
        network.free_subnet(thirds=range(7, 9))
