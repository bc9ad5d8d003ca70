"""Progress of a Ray Train run on the driver: each epoch's line as it ends, whatever the workers' logs do."""

from __future__ import annotations

import math
import sys
import threading
from typing import Any


class EpochProgress:
    """Each epoch's line on the driver (epoch i/N, train loss, val MPJPE, s/epoch, ETA), whatever the worker logs.

    `callback()` is a Ray Train UserCallback run by the controller (an actor); it passes rank 0's metrics through
    a Ray queue to a thread of the driver, which prints them to stderr while `fit()` runs."""

    def __init__(self, epochs: int):
        from ray.util.queue import Queue

        self.epochs, self.queue, self.seconds = epochs, Queue(actor_options={"num_cpus": 0}), []

    def callback(self) -> Any:
        from ray.train import UserCallback

        queue = self.queue

        class _Report(UserCallback):
            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                if metrics:
                    queue.put_nowait({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))})

        return _Report()

    def line(self, m: dict[str, Any]) -> str:
        self.seconds.append(float(m.get("epoch_seconds", float("nan"))))
        return progress_line(m, self.epochs, self.seconds)

    def fit(self, trainer: Any) -> Any:
        """trainer.fit(), printing each epoch's line as it arrives."""
        from ray.util.queue import Empty

        done = threading.Event()

        def pump() -> None:
            while not (done.is_set() and self.queue.empty()):
                try:
                    print(self.line(self.queue.get(timeout=0.5)), file=sys.stderr, flush=True)
                except Empty:
                    continue

        thread = threading.Thread(target=pump, name="h2ot-epoch-progress", daemon=True)
        thread.start()
        try:
            return trainer.fit()
        finally:
            done.set()
            thread.join(timeout=10)
            self.queue.shutdown()


def progress_line(m: dict[str, Any], epochs: int, seconds: list[float]) -> str:
    """One epoch's progress from rank 0's reported metrics; seconds: the epochs seen so far (ETA = their mean x
    the epochs left)."""
    eta = (epochs - int(m["epoch"])) * sum(seconds) / max(1, len(seconds))
    return (f"epoch {m['epoch']}/{epochs}  train loss {m['train/loss']:.4f}  val MPJPE {m['val/mpjpe_mm']:.1f} mm  "
            f"{seconds[-1]:.1f} s/epoch  ETA {format_seconds(eta)}")


def format_seconds(seconds: float) -> str:
    """1h02m, 3m05s, 42s ("?" when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
