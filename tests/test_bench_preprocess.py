"""h2ot bench-preprocess: the copies of a larger input, the memory sampler, the command line; the end-to-end run
(which starts Ray) is slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from h2ot.skeleton import H36M32_TO_17, bone_lengths
from jobs.bench_preprocess import parse_args
from pipelines import build_shards
from pipelines.bench import PssSampler, _job_argv, moved_copy, write_copies
from pipelines.records import PipelineError
from pipelines.safe_npz import load_npz, unwrap


def _h36m_file(path: Path) -> str:
    rng = np.random.default_rng(1)
    walk = np.repeat(rng.normal(0, 0.1, size=(1, 32, 3)), 80, axis=0) + [0.3, -0.2, 1.0]
    walk[..., 1] += np.linspace(-0.5, 0.5, 80)[:, None]
    positions = {"S1": {"Walking": walk.astype(np.float32)}, "S9": {"Eating": walk[:50].astype(np.float32)}}
    np.savez_compressed(path, positions_3d=np.array(positions, dtype=object))
    return str(path)


def test_copies_are_distinct_rigid_motions_written_once(tmp_path):
    src = _h36m_file(tmp_path / "data_3d_h36m.npz")
    files = write_copies(src, 3, tmp_path / "cache")
    assert files[0] == str(Path(src).resolve()) and len(files) == 3
    assert len({Path(f).read_bytes() for f in files}) == 3  # distinct bytes: no parse cache can reuse one
    original = unwrap(load_npz(src)["positions_3d"])
    for i, f in enumerate(files[1:], 1):
        copy = unwrap(load_npz(f)["positions_3d"])
        for subject, actions in original.items():
            for action, x in actions.items():
                y = copy[subject][action]
                assert y.shape == x.shape and y.dtype == x.dtype and not np.allclose(y, x)
                joints = list(H36M32_TO_17)  # rigid: the same bone lengths, the same heights
                np.testing.assert_allclose(bone_lengths(y[:, joints]), bone_lengths(x[:, joints]), atol=1e-5)
                np.testing.assert_allclose(y[..., 2], x[..., 2], atol=1e-6)
        np.testing.assert_array_equal(copy["S1"]["Walking"], moved_copy(original, i)["S1"]["Walking"])
    mtimes = [os.stat(f).st_mtime_ns for f in files[1:]]
    again = write_copies(src, 4, tmp_path / "cache")  # reuses the first two, writes the third
    assert again[:3] == files and [os.stat(f).st_mtime_ns for f in again[1:3]] == mtimes
    m = build_shards("h36m", out=tmp_path / "o", input=again, frames=27, stride=27, use_ray=False)
    one = build_shards("h36m", out=tmp_path / "o1", input=src, frames=27, stride=27, use_ray=False)
    assert m["sequences_quarantined"] == 0  # every copy stays in the cameras' view
    assert m["counts"]["train"]["windows"] == 4 * one["counts"]["train"]["windows"]
    with pytest.raises(PipelineError, match="no such file"):
        write_copies(tmp_path / "nope.npz", 2, tmp_path / "cache")


def test_pss_sampler_sees_a_child_process_memory():
    code = "import time, numpy as np; x = np.ones(40 * 2**20 // 8); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                             f"{code!r}])"])
    with PssSampler(proc.pid, [], 0.0) as pss:  # the memory is in a grandchild: descendants count
        proc.wait()
    assert pss.peak_mb > 40 and pss.sampler_cpu_s >= 0


def test_the_interface_flags_and_the_job_command():
    args = parse_args(["--address", "10.0.0.1:6379", "--copies", "10", "--ray-only", "--json", "--workdir", "/w"])
    assert (args.address, args.copies, args.ray_only, args.json, args.workdir) == ("10.0.0.1:6379", 10, True, True,
                                                                                   "/w")
    argv = _job_argv("h36m", ["a.npz", "b.npz"], "/o", 243, 81, use_ray=False, num_cpus=2,
                     options={"rows_per_shard": 64})
    assert argv[1:3] == ["-m", "jobs.preprocess"] and argv[argv.index("--input") + 1:][:2] == ["a.npz", "b.npz"]
    assert "--no-ray" in argv and argv[argv.index("--set") + 1] == "rows_per_shard=64"


@pytest.mark.slow
def test_bench_on_two_copies_compares_both_paths(tmp_path):
    src = _h36m_file(tmp_path / "data_3d_h36m.npz")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "bench-preprocess", "--source", "h36m", "--input", src,
                           "--frames", "27", "--stride", "27", "--copies", "2", "--json", "--workdir",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["copies"] == 2 and len(figures["input"]) == 2 and figures["same_rows"] is True
    for key in ("windows", "seconds_ray", "windows_per_s_ray", "content_hash", "peak_pss_mb_ray", "ratio",
                "seconds_numpy", "windows_per_s_numpy", "peak_pss_mb_numpy", "timings_ray", "load_average_after"):
        assert key in figures, key
    assert figures["peak_pss_mb_ray"] > figures["peak_pss_mb_numpy"] > 10
    assert figures["timings_ray"]["tasks"] >= 2


def test_an_address_where_nothing_answers_is_a_clear_error():
    import socket

    from pipelines.bench import resolve_address

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match="nothing answers there"):
        resolve_address(f"127.0.0.1:{port}")
    with pytest.raises(PipelineError, match="expected HOST:PORT"):
        resolve_address("no-port")
