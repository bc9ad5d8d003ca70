"""`h2ot bench`: the HoT and H2OT schedules it compares, and clips per second at a given batch size."""

from __future__ import annotations

import json

import pytest


def test_bench_compares_hot_at_block_1_for_dstformer() -> None:
    from jobs.bench import _variants

    variants = _variants("dstformer")
    assert variants["hot"].schedule == [[1, 81]] and variants["h2ot"].schedule == [[1, 81], [3, 41]]
    assert _variants("mixste")["hot"].schedule == [[3, 81]]


def test_bench_counts_clips_per_second_per_batch(capsys) -> None:
    from jobs.bench import main

    assert main(["--preset", "frameformer_small", "--batch", "4", "--repeats", "2", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 4 and out["h2ot_schedule"] == [[1, 13], [2, 9]]
    assert out["full_clips_per_s"] > 0 and out["flops_ratio_linear"] < 1
    with pytest.raises(SystemExit):
        main(["--batch", "0"])


def test_timed_rounds_fill_the_seconds_unless_repeats_are_given() -> None:
    """Without --repeats, fast entries get as many rounds as fill --seconds (at least the minimum, at most
    MAX_ROUNDS) and, in their turn, a burst of forwards back to back after an untimed one; with --repeats
    (seconds=0) and --burst 1 exactly one timed forward a turn."""
    import time

    import torch

    from jobs.bench import BURST_SECONDS, MAX_ROUNDS, Entry, _time

    calls = []
    entries = [Entry(name, "eager", "fp32", lambda x, n=name: (calls.append(n), time.sleep(0.002)), None)
               for name in ("full", "h2ot")]
    x = torch.zeros(1)
    timed, rounds, burst = _time(entries, x, repeats=3, warmup=1, seconds=0.5)
    assert 1 < burst <= round(BURST_SECONDS / 0.002)  # a forward sleeps 2 ms (and takes a little longer)
    assert 3 < rounds <= MAX_ROUNDS
    assert len(calls) == 2 + 2 * rounds * (burst + 1) and set(timed) == {e.key for e in entries}
    assert all(0.002 <= t < 0.05 for t in timed.values())  # seconds per forward, not per burst
    calls.clear()
    _, rounds, burst = _time(entries, x, repeats=3, warmup=1, seconds=0.0, burst=1)
    assert (rounds, burst) == (3, 1) and len(calls) == 8
