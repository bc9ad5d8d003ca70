"""Processes through Linux /proc: what the local cluster and a failed local Ray start need to stop exactly
what they started, and nothing else.

A process is identified by its pid *and* its start time (`/proc/<pid>/stat` field 22, in clock ticks since
boot), so a pid the kernel has since given to another process is never mistaken for ours.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STAT_START_TICKS = 19  # field 22 of /proc/<pid>/stat, counted from the state field (the one after `comm`)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the `(comm)` field (which may hold spaces), or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[STAT_START_TICKS]) if fields else None


def is_alive(pid: int | None, ticks: int | None) -> bool:
    """`pid` runs, is not a zombie, and is the process recorded (same start time, so not a reused pid)."""
    if pid is None or ticks is None:
        return False
    fields = _stat_fields(pid)
    return fields is not None and int(fields[STAT_START_TICKS]) == ticks and fields[0] not in ("Z", "X")


def has_marker(pid: int, marker: str, value: str) -> bool:
    """Whether `pid`'s environment holds `marker=value` (children inherit it, so it finds every descendant)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{marker}={value}".encode() in env.split(b"\0")


def marked_pids(marker: str, value: str) -> list[int]:
    """Every live process (this one excepted) whose environment holds `marker=value`."""
    own = os.getpid()
    return sorted(int(e.name) for e in Path("/proc").iterdir()
                  if e.name.isdigit() and int(e.name) != own and has_marker(int(e.name), marker, value))


def send_signal(pids: list[int], sig: int) -> None:
    """`sig` to each of `pids`; the ones already gone are skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (children, grandchildren, ...), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(int(stat.parent.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def stop_descendants(pid: int | None = None, grace_s: float = 3.0) -> None:
    """SIGTERM every descendant of `pid` (default: this process), then SIGKILL what is left after `grace_s`."""
    kids = descendants(os.getpid() if pid is None else pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        send_signal(kids, sig)
        time.sleep(grace_s)
        kids = [p for p in kids if Path(f"/proc/{p}").exists()]
        if not kids:
            return
