"""`h2ot stream`: 2D keypoints, one frame per line on stdin -> one 3D pose per frame on stdout, live.

    detector ... | h2ot stream --checkpoint model.onnx --layout coco17 --width 1920 --height 1080 [--fps 50] [--hop N]

Input: JSON lines, one frame each, in any per-frame form `h2ot infer` reads (docs/INFER.md: a list of 17 [x, y] or
[x, y, score]; an object with `keypoints` (+ `keypoint_scores`); an MMPose frame with `instances`); `null` is a
frame without a person. Output: one JSON line per input frame, in order, exactly once:
{"frame": k, "pose_3d": [[x, y, z] x 17], "filled": bool} in metres, root-relative, camera frame, H36M-17 order
("filled": its keypoints were missing or unreadable and were filled from the neighbouring frames).

Emission rule (window T = the model's frames, hop H, lookahead L = (T - H) // 2): frames are answered in blocks of
H; block m (frames mH .. mH+H-1) is answered by one forward pass as soon as frame mH+H-1+L has arrived, on the window
of the T frames ending there, where the block sits in the middle (L frames of future context after it). Before
the first frame the window is padded by repeating frame 0, as `h2ot infer` pads a sequence. So frame k waits
for at most L + H - 1 later frames, plus one forward pass: the fixed delay. End of input flushes the tail: the
last frame is repeated as future context. A seq2frame model answers one frame a forward (H = 1).

Hop (default): a quarter window, or more when this machine's forward pass is too slow for that: one forward is
timed at start-up and H is raised to the smallest hop whose time budget H / fps holds the forward with a margin
(HOP_MARGIN), at most T. `--hop N` fixes it (the poses depend on H: give it for reproducible output).

A line that cannot be read (not JSON, wrong joint count, ...) gets one message on stderr with its line number, and
its frame is filled from its neighbours (as `h2ot infer` fills gaps: linear between the nearest good frames in the
window, the nearest good frame at its ends); `--strict` stops instead (exit 2). A blank line is not a frame (a
note on stderr). docs/DEPLOY.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from h2ot.keypoints import model_input
from h2ot.models import predict
from h2ot.skeleton import ROOT_JOINT
from jobs._common import UserError, friendly_errors

log = logging.getLogger("h2ot.stream")
SCORE_ABSENT = 1.0  # the score of a keypoint given without one (as h2ot.keypoints.model_input assumes)
ROUND_DIGITS = 5  # 10 micrometres


DEFAULT_FPS = 50.0  # Human3.6M's frame rate
HOP_MARGIN = 1.25  # a hop's time budget must hold this many forward passes (jitter, the window's own work)


def default_hop(frames: int) -> int:
    """A quarter window: at paper size (243) a forward every 60 frames."""
    return max(1, frames // 4)


def hop_for(frames: int, forward_s: float, fps: float) -> int:
    """The default hop: a quarter window, or the smallest hop that keeps up with `fps` when one forward takes
    `forward_s` (H / fps >= HOP_MARGIN x forward_s), at most the window."""
    keeps_up = int(np.ceil(HOP_MARGIN * forward_s * fps - 1e-9))
    return min(frames, max(default_hop(frames), keeps_up))


def lookahead(frames: int, hop: int) -> int:
    return (frames - hop) // 2


class LineError(ValueError):
    """A line that is not a readable frame (its message names the line)."""


def parse_frame(text: str, line_number: int, layout: str) -> np.ndarray | None:
    """One JSON line -> H36M-17 pixels [17, 3] (NaN where missing; score 1.0 when absent), or None for a frame
    without a person (`null`, or every keypoint missing). Raises LineError with the line number."""
    from h2ot.keypoints import KeypointError, parse_keypoints_json, to_h36m, validate_keypoints

    where = f"line {line_number}"
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if item is None:
        return None
    try:
        kp = validate_keypoints(parse_keypoints_json([item], source="stdin"), where)
        kp = to_h36m(kp, layout)[0]
    except KeypointError as e:
        message = str(e).replace("stdin: frame 0", where).replace("stdin", where)
        if "no frame has keypoints" in message:
            return None  # an MMPose frame without instances: no person
        raise LineError(message) from None
    if kp.shape[1] == 2:
        kp = np.concatenate([kp, np.full((kp.shape[0], 1), SCORE_ABSENT)], axis=1)
    if np.isnan(kp[:, :2]).all():
        return None
    return kp


@dataclass
class Emitted:
    frame: int
    pose_3d: np.ndarray | None  # [17, 3] metres, or None when no frame of the stream ever had keypoints
    filled: bool


@dataclass
class Streamer:
    """The rolling window of the module docstring. `push` a frame (H36M-17 pixels [17, 3], None if missing),
    get back the frames answered by it (in order); `finish` answers the rest."""

    model: Callable
    cfg: object
    width: int
    height: int
    hop: int
    test_flip: bool = True
    forward_estimate_s: float = 0.0  # one forward timed at start-up (make_streamer)
    frames_seen: int = 0
    _pixels: list[np.ndarray | None] = field(default_factory=list)  # keypoints of frames _offset, _offset + 1, ...
    _offset: int = 0
    _emitted: int = 0
    forward_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.cfg.frames
        if self.cfg.seq2frame:
            self.hop = 1
        if not 1 <= self.hop <= t:
            raise UserError(f"--hop must be between 1 and the model's {t} frames, got {self.hop}")
        self.lookahead = lookahead(t, self.hop)
        self._last_good = np.full((self.cfg.joints, 3), np.nan)  # each joint's last known keypoint

    def warm_up(self, timed: int = 0) -> float:
        """One forward on a still pose, so that the first frames do not pay for lazy set-up (allocations,
        kernels chosen on first use); then `timed` more, whose slowest time it returns (0.0 if none)."""
        slowest = 0.0
        with torch.inference_mode():  # the input made inside, as _forward makes it: torch.compile guards on that
            x = torch.zeros(1, self.cfg.frames, self.cfg.joints, self.cfg.in_channels)
            for i in range(1 + timed):
                began = time.perf_counter()
                predict(self.model, x, test_flip=self.test_flip)
                if i:
                    slowest = max(slowest, time.perf_counter() - began)
        return slowest

    def set_hop(self, hop: int) -> None:
        self.hop = 1 if self.cfg.seq2frame else hop
        self.lookahead = lookahead(self.cfg.frames, self.hop)

    @property
    def delay_frames(self) -> int:
        """The most frames a frame waits for (the lookahead plus the rest of its block)."""
        return self.lookahead + self.hop - 1

    def push(self, kp: np.ndarray | None) -> list[Emitted]:
        self._pixels.append(kp)
        self.frames_seen += 1
        if kp is not None:
            present = ~np.isnan(kp[:, :2]).any(axis=-1)
            self._last_good[present] = kp[present]
        return self._answer(final=False)

    def finish(self) -> list[Emitted]:
        return self._answer(final=True)

    def _answer(self, final: bool) -> list[Emitted]:
        out: list[Emitted] = []
        while self._emitted < self.frames_seen:
            window_end = self._emitted + self.hop - 1 + self.lookahead  # the frame whose arrival triggers it
            if not final and (window_end >= self.frames_seen or np.isnan(self._last_good).all()):
                break  # not yet: its future context, or any keypoints at all, are still to come
            block_end = min(self._emitted + self.hop, self.frames_seen) - 1
            out += self._forward(self._emitted, block_end, window_end)
            self._forget_before(self._emitted - self.cfg.frames)
        return out

    def _forget_before(self, frame: int) -> None:
        """Drop frames no later window reaches (memory stays one window long)."""
        drop = frame - self._offset
        if drop > 0:
            del self._pixels[:drop]
            self._offset += drop

    def _frame(self, k: int) -> np.ndarray | None:
        return self._pixels[k - self._offset]

    def _window(self, window_end: int) -> tuple[np.ndarray, int]:
        """Pixels [T, 17, 3] of the frames window_end-T+1 .. window_end (clamped to the frames seen: the first
        and last frames repeat at the ends), gaps filled; and the first frame of that span."""
        from h2ot.keypoints import fill_gaps

        t = self.cfg.frames
        first = window_end - t + 1
        idx = np.clip(np.arange(first, window_end + 1), 0, self.frames_seen - 1)
        nan = np.full((self.cfg.joints, 3), np.nan)
        window = np.stack([nan if self._frame(i) is None else self._frame(i) for i in idx])
        filled, _ = fill_gaps(self._fill_absent_joints(window), max_gap=t, source="stream window")
        return filled, first

    def _fill_absent_joints(self, window: np.ndarray) -> np.ndarray:
        """A joint missing in the whole window takes its last known position (or, never seen, the centre of the
        frame's other joints, score 0), so that gap filling always has something to interpolate from."""
        absent = np.isnan(window[..., :2]).any(axis=-1).all(axis=0)  # [J]
        for j in np.flatnonzero(absent):
            if not np.isnan(self._last_good[j, :2]).any():
                window[:, j] = self._last_good[j]
            else:
                window[:, j, :2] = np.nanmean(window[..., :2], axis=1)
                window[:, j, 2] = 0.0
        return window

    def _forward(self, start: int, stop: int, window_end: int) -> list[Emitted]:
        """Answer frames start..stop with one forward on the window ending at window_end."""
        if np.isnan(self._last_good).all():  # the whole stream had no person: answer without a pose
            self._emitted = stop + 1
            return [Emitted(k, None, True) for k in range(start, stop + 1)]
        pixels, first = self._window(window_end)
        x = model_input(pixels, self.width, self.height, self.cfg.in_channels)
        began = time.perf_counter()
        with torch.inference_mode():
            pose = predict(self.model, torch.from_numpy(x)[None], test_flip=self.test_flip).pose_3d[0]
        self.forward_seconds.append(time.perf_counter() - began)
        pose = pose.float().cpu().numpy().astype(np.float64)
        pose = pose - pose[:, ROOT_JOINT : ROOT_JOINT + 1]
        out = []
        for k in range(start, stop + 1):
            position = 0 if self.cfg.seq2frame else k - first  # seq2frame: the one output is the centre frame
            kp = self._frame(k)
            out.append(Emitted(k, pose[position], kp is None or bool(np.isnan(kp[:, :2]).any())))
        self._emitted = stop + 1
        return out


def emitted_json(e: Emitted) -> str:
    pose = None if e.pose_3d is None else [[round(float(v), ROUND_DIGITS) for v in joint] for joint in e.pose_3d]
    return json.dumps({"frame": e.frame, "pose_3d": pose, "filled": e.filled})


def run_stream(lines: Iterable[str], streamer: Streamer, layout: str, write: Callable[[str], None],
               warn: Callable[[str], None], strict: bool = False) -> int:
    """Feed `lines` through `streamer`, writing one JSON line per frame. Returns the number of bad lines."""
    bad = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            warn(f"line {number}: blank, not a frame (skipped)")
            continue
        try:
            kp = parse_frame(text, number, layout)
        except LineError as e:
            if strict:
                raise UserError(f"{e} (--strict)") from None
            bad += 1
            warn(f"{e}; frame {streamer.frames_seen} is filled from its neighbours")
            kp = None
        for e in streamer.push(kp):
            write(emitted_json(e))
    for e in streamer.finish():
        write(emitted_json(e))
    return bad


def build_parser() -> argparse.ArgumentParser:
    from h2ot.keypoints import LAYOUTS

    p = argparse.ArgumentParser(prog="h2ot stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model: .pt (h2ot train) or .onnx (h2ot export)")
    p.add_argument("--layout", choices=LAYOUTS, default="coco17", help="joint order of the input (default coco17)")
    p.add_argument("--width", type=int, required=True, help="image width in pixels")
    p.add_argument("--height", type=int, required=True, help="image height in pixels")
    p.add_argument("--hop", type=int, default=None,
                   help="frames between forward passes (default: a quarter window, more if a forward is too slow "
                        "for --fps)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS,
                   help="frame rate of the input (default %(default)g): sets the default hop")
    p.add_argument("--runtime", choices=("eager", "compile", "onnx"), default=None,
                   help="default: onnx for .onnx, eager for .pt")
    p.add_argument("--no-flip", action="store_true", help="no test-time flip averaging (half the work)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable line (exit 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def make_streamer(checkpoint: str, runtime: str | None, width: int, height: int, hop: int | None,
                  test_flip: bool, threads: int | None = None, fps: float = DEFAULT_FPS) -> Streamer:
    """A warmed-up Streamer; hop None: the default of the module docstring, from one forward timed here."""
    from jobs.infer import load_model_for

    if width <= 0 or height <= 0:
        raise UserError(f"--width and --height must be positive pixels, got {width}x{height}")
    if fps <= 0:
        raise UserError(f"--fps must be positive, got {fps}")
    if threads:
        torch.set_num_threads(threads)
    model, cfg = load_model_for(checkpoint, runtime)
    streamer = Streamer(model, cfg, width, height, default_hop(cfg.frames) if hop is None else hop, test_flip)
    streamer.forward_estimate_s = streamer.warm_up(timed=1)
    if hop is None and not cfg.seq2frame:
        streamer.set_hop(hop_for(cfg.frames, streamer.forward_estimate_s, fps))
    budget = streamer.hop / fps
    if streamer.forward_estimate_s > budget:
        log.warning("one forward took %.2f s, more than a hop's %.2f s at %g frames/s: the stream will fall behind "
                    "(try --no-flip, --runtime compile, an exported .onnx model, or a larger --hop)",
                    streamer.forward_estimate_s, budget, fps)
    return streamer


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    streamer = make_streamer(args.checkpoint, args.runtime, args.width, args.height, args.hop, not args.no_flip,
                             args.threads, args.fps)
    print(f"stream: window {streamer.cfg.frames} frames, hop {streamer.hop}, lookahead {streamer.lookahead}: "
          f"a frame is answered at most {streamer.delay_frames} frames after it arrives, plus one forward pass "
          f"({streamer.delay_frames / args.fps + streamer.forward_estimate_s:.2f} s at {args.fps:g} frames/s, "
          f"forward {streamer.forward_estimate_s:.2f} s)", file=sys.stderr)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def warn(message: str) -> None:
        print(f"stream: {message}", file=sys.stderr, flush=True)

    bad = run_stream(sys.stdin, streamer, args.layout, write, warn, args.strict)
    print(f"stream: {streamer.frames_seen} frames answered, {bad} unreadable lines", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- h2ot bench --stream
def bench_stream(checkpoint: str, fps: float, hop: int | None, frames: int, runtime: str | None = None,
                 threads: int | None = None, test_flip: bool = True) -> dict:
    """Feed a generated walking-like sequence at `fps` frames/s in real time, with `h2ot stream`'s defaults (hop
    chosen as it chooses it, flip on unless test_flip=False); measure each frame's latency from its arrival to its
    pose, and the rate at which poses come out.

    One thread: a forward that takes longer than a hop delays the frames behind it, which shows as rising
    latency and a sustained rate below `fps`. The sustained rate is that of the steady state: the frames answered
    between the first and the last forward triggered while frames were still arriving, over the time between
    those two answers (the start-up wait and the flush at the end are the stated delay, not a rate)."""
    if fps <= 0 or frames < 1:
        raise UserError(f"--fps must be positive and --frames >= 1, got {fps} and {frames}")
    width, height = 1000, 1000
    streamer = make_streamer(checkpoint, runtime, width, height, hop, test_flip, threads, fps)
    sequence = _recorded_sequence(frames, width, height)
    arrival, answered = np.zeros(frames), np.zeros(frames)
    blocks: list[tuple[int, float]] = []  # (frames answered so far, time) after each forward during the stream
    start = time.perf_counter()
    for k in range(frames):
        arrival[k] = start + k / fps
        wait = arrival[k] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        emitted = streamer.push(sequence[k])
        for e in emitted:
            answered[e.frame] = time.perf_counter()
        if emitted:
            blocks.append((emitted[-1].frame + 1, answered[emitted[-1].frame]))
    for e in streamer.finish():
        answered[e.frame] = time.perf_counter()
    steady = slice(0, max(1, frames - streamer.delay_frames))  # the flushed tail is answered early
    latency = (answered - arrival)[steady]
    quarter = max(1, len(latency) // 4)
    stated = streamer.delay_frames / fps
    return {
        "checkpoint": checkpoint, "frames": frames, "fps_offered": fps, "window": streamer.cfg.frames,
        "hop": streamer.hop, "lookahead": streamer.lookahead, "test_flip": test_flip,
        "stated_delay_frames": streamer.delay_frames, "stated_delay_s": round(stated, 3),
        "stated_delay_plus_forward_s": round(stated + statistics.median(streamer.forward_seconds), 3),
        "sustained_fps": _steady_rate(blocks),
        "end_to_end_s": round(answered.max() - start, 3),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 4),
        "latency_p99_s": round(float(np.percentile(latency, 99)), 4),
        "latency_max_s": round(float(latency.max()), 4),
        # rising latency = falling behind: the median of the last quarter of the steady frames minus the first's
        "latency_drift_s": round(float(np.median(latency[-quarter:]) - np.median(latency[:quarter])), 4),
        "forward_median_s": round(statistics.median(streamer.forward_seconds), 4),
        "forward_startup_s": round(streamer.forward_estimate_s, 4),
        "forwards": len(streamer.forward_seconds),
    }


def _steady_rate(blocks: list[tuple[int, float]]) -> float | None:
    """Frames/s between the first and the last answer during the stream (None with fewer than two answers: feed
    more --frames)."""
    if len(blocks) < 2 or blocks[-1][1] <= blocks[0][1]:
        return None
    (first_done, first_time), (last_done, last_time) = blocks[0], blocks[-1]
    return round((last_done - first_done) / (last_time - first_time), 2)


def _recorded_sequence(frames: int, width: int, height: int) -> list[np.ndarray]:
    """A person standing and swinging their arms, projected to H36M-17 pixels [17, 3] per frame."""
    from h2ot.skeleton import NUM_JOINTS

    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.15, (NUM_JOINTS, 3)) + [0.0, 0.0, 4.0]
    out = []
    for k in range(frames):
        pose = base + 0.05 * np.sin(k / 8.0 + np.arange(NUM_JOINTS))[:, None]
        xy = pose[:, :2] / pose[:, 2:] * 1000 + [width / 2, height / 2]
        out.append(np.concatenate([xy, np.ones((NUM_JOINTS, 1))], axis=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
