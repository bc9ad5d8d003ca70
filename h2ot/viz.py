"""Pictures of a lifted sequence (matplotlib, Agg backend, no display needed).

- `plot_input_output`: a few frames, the 2D input (pixels, image y down) beside the 3D output.
- `plot_kept_frames`: the hourglass made visible — which frames each pruning stage kept, for the first window
  and as a fraction of windows over the whole sequence.
- `animate_3d`: the 3D skeleton over time, as a GIF (Pillow) or MP4 (only where ffmpeg exists).

Colours: the subject's left side blue, right side red, the spine and head grey. The 3D views show the camera
frame (x right, y down, z forward) turned so the person stands upright: plotted as (x, z, -y).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import animation  # noqa: E402

from h2ot.skeleton import BONES, LEFT_JOINTS, RIGHT_JOINTS  # noqa: E402

if TYPE_CHECKING:
    from h2ot.inference import InferenceResult

LEFT_COLOUR = "#1f77b4"  # blue
RIGHT_COLOUR = "#d62728"  # red
CENTRE_COLOUR = "#555555"
DEFAULT_GRID_FRAMES = 4
MAX_ANIMATION_FRAMES = 200  # longer sequences are subsampled so a GIF stays small
MAX_OUTLINED_CELLS = 100  # windows up to this many frames get one outlined cell per frame
VIEW_ELEVATION_DEG = 12.0
VIEW_AZIMUTH_DEG = -70.0


def joint_colour(joint: int) -> str:
    if joint in LEFT_JOINTS:
        return LEFT_COLOUR
    if joint in RIGHT_JOINTS:
        return RIGHT_COLOUR
    return CENTRE_COLOUR


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None and animation.writers.is_available("ffmpeg")


def pick_frames(frames: int, count: int = DEFAULT_GRID_FRAMES) -> list[int]:
    """`count` frames spread evenly over a sequence of `frames` (first and last included)."""
    return sorted({int(round(v)) for v in np.linspace(0, frames - 1, min(count, frames))})


def _upright(pose_3d: np.ndarray) -> np.ndarray:
    """Camera frame (x right, y down, z forward) [..., 3] -> plot axes (x, depth z, up -y)."""
    return np.stack([pose_3d[..., 0], pose_3d[..., 2], -pose_3d[..., 1]], axis=-1)


def _radius(poses_3d: np.ndarray) -> float:
    return max(float(np.abs(poses_3d).max()) * 1.1, 1e-3)


def _setup_3d(ax, radius: float) -> None:
    ax.set_xlim(-radius, radius)
    ax.set_ylim(-radius, radius)
    ax.set_zlim(-radius, radius)
    ax.set_box_aspect((1, 1, 1), zoom=1.25)
    ax.view_init(elev=VIEW_ELEVATION_DEG, azim=VIEW_AZIMUTH_DEG)
    ax.set_xlabel("x", labelpad=-12)
    ax.set_ylabel("z (depth)", labelpad=-12)
    ax.set_zlabel("-y (up)", labelpad=-12)
    ax.set_xticklabels([])
    ax.set_yticklabels([])
    ax.set_zticklabels([])


def _draw_3d(ax, pose_3d: np.ndarray) -> list:
    p = _upright(pose_3d)
    artists = []
    for child, parent in BONES:
        (line,) = ax.plot(*p[[child, parent]].T, color=joint_colour(child), lw=2.5)
        artists.append(line)
    return artists


def _draw_2d(ax, kp: np.ndarray) -> None:
    for child, parent in BONES:
        ax.plot(*kp[[child, parent], :2].T, color=joint_colour(child), lw=2)
    colours = [joint_colour(j) for j in range(kp.shape[0])]
    ax.scatter(kp[:, 0], kp[:, 1], c=colours, s=10, zorder=3)


def plot_input_output(
    keypoints_2d: np.ndarray,
    poses_3d: np.ndarray,
    path: str | Path,
    frames: list[int] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> Path:
    """PNG: one column per frame, the 2D input (pixels, H36M-17 `[T, 17, 2|3]`) above the 3D output
    (`[T, 17, 3]` metres). The 2D view is cropped around the person over the shown frames."""
    path = Path(path)
    frames = frames if frames is not None else pick_frames(len(poses_3d))
    fig = plt.figure(figsize=(3.2 * len(frames), 7.0))
    shown = keypoints_2d[frames, :, :2]
    lo, hi = shown.reshape(-1, 2).min(axis=0), shown.reshape(-1, 2).max(axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) * 0.6, 1.0)
    radius = _radius(poses_3d[frames])
    for col, t in enumerate(frames):
        ax = fig.add_subplot(2, len(frames), col + 1)
        _draw_2d(ax, keypoints_2d[t])
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] + half, centre[1] - half)  # image y points down
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
        size = f" of {width}x{height}" if width and height else ""
        ax.set_title(f"frame {t}: 2D input (px{size})", fontsize=8)
        ax3 = fig.add_subplot(2, len(frames), len(frames) + col + 1, projection="3d")
        _draw_3d(ax3, poses_3d[t])
        _setup_3d(ax3, radius)
        ax3.set_title(f"frame {t}: 3D output (box ±{radius:.2f} m)", fontsize=8)
    fig.suptitle("2D keypoints in, 3D poses out (left side blue, right side red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_kept_frames(result: InferenceResult, path: str | Path) -> Path:
    """PNG of the hourglass: which frames each pruning stage kept.

    Top: the first window, rows = input, each stage, the recovered output; a filled cell = a frame token.
    Bottom: over the whole sequence, for each stage, the fraction of the windows covering a frame that kept it.
    """
    path = Path(path)
    plan, stages = result.plan, result.stage_tokens
    window = plan.window
    labels = [f"input: {window} frames"]
    labels += [f"stage {s + 1}: keeps {n} (block {b})" for s, (n, b) in enumerate(zip(stages, result.stage_blocks))]
    labels.append("output: centre frame" if result.seq2frame else f"recovered: {window} frames")
    first = np.zeros((len(labels), window))
    first[0] = 1
    for s, pos in enumerate(result.kept_positions[0] if result.kept_positions else []):
        first[s + 1, pos] = 1
    if result.seq2frame:
        first[-1, window // 2] = 1
    else:
        first[-1] = 1
    real = np.zeros(window, dtype=bool)
    real[plan.sequence_frames(0, np.arange(window)) - plan.starts[0] + plan.pad_left] = True

    fig, (ax_top, ax_bottom) = plt.subplots(
        2, 1, figsize=(11, 2.2 + 0.45 * len(labels) + 0.45 * max(len(stages), 1)),
        gridspec_kw={"height_ratios": [len(labels), max(len(stages), 1)]},
    )
    shade = first * np.where(real, 1.0, 0.45)  # padded (repeated) frames drawn lighter
    edges = dict(edgecolors="white", linewidth=0.5) if window <= MAX_OUTLINED_CELLS else {}
    ax_top.pcolormesh(np.arange(window + 1) - 0.5, np.arange(len(labels) + 1) - 0.5, shade, cmap="Greens",
                      vmin=0, vmax=1, **edges)
    ax_top.invert_yaxis()
    ax_top.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_top.set_xlabel("frame position in the first window (light: edge padding)", fontsize=8)
    ax_top.set_title("Hierarchical hourglass: frame tokens kept per stage (first window)", fontsize=10)
    ax_top.set_xticks(_ticks(window))
    ax_top.tick_params(labelsize=7)

    if stages:
        counts = np.zeros((len(stages), plan.frames))
        covered = np.zeros(plan.frames)
        for w, kept in enumerate(result.kept_positions):
            covered[plan.sequence_frames(w, np.arange(window))] += 1
            for s, pos in enumerate(kept):
                counts[s, plan.sequence_frames(w, pos)] += 1
        fraction = counts / np.maximum(covered, 1)
        im = ax_bottom.imshow(fraction, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax_bottom.set_yticks(range(len(stages)), [f"stage {s + 1} ({n})" for s, n in enumerate(stages)], fontsize=8)
        fig.colorbar(im, ax=ax_bottom, fraction=0.03, pad=0.01, label="kept / windows")
        ax_bottom.set_title(f"over the sequence: {len(result.kept_positions)} windows", fontsize=9)
    else:
        ax_bottom.text(0.5, 0.5, "no pruning stages: a full model keeps every frame", ha="center", va="center")
        ax_bottom.set_yticks([])
        ax_bottom.set_xlim(0, plan.frames - 1)
    ax_bottom.set_xlabel("sequence frame", fontsize=8)
    ax_bottom.set_xticks(_ticks(plan.frames))
    ax_bottom.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ticks(n: int, count: int = 10) -> list[int]:
    step = max(1, int(np.ceil(n / count)))
    return list(range(0, n, step))


def animate_3d(
    poses_3d: np.ndarray, path: str | Path, fps: float = 25.0, max_frames: int = MAX_ANIMATION_FRAMES
) -> Path:
    """Animated 3D skeleton `[T, 17, 3]` -> `path` (.gif with Pillow; .mp4 needs ffmpeg). Sequences longer than
    `max_frames` are subsampled (the frame rate drops with them, so the duration is kept)."""
    path = Path(path)
    step = max(1, int(np.ceil(len(poses_3d) / max_frames)))
    shown = poses_3d[::step]
    if path.suffix.lower() == ".mp4":
        if not ffmpeg_available():
            raise RuntimeError("writing MP4 needs ffmpeg on PATH; write a .gif instead")
        writer = animation.FFMpegWriter(fps=fps / step)
    else:
        writer = animation.PillowWriter(fps=fps / step)
    fig = plt.figure(figsize=(4, 4))
    ax = fig.add_subplot(projection="3d")
    _setup_3d(ax, _radius(poses_3d))
    lines = _draw_3d(ax, shown[0])
    title = ax.set_title("", fontsize=9)

    def update(i: int) -> list:
        p = _upright(shown[i])
        for line, (child, parent) in zip(lines, BONES):
            line.set_data_3d(*p[[child, parent]].T)
        title.set_text(f"frame {i * step}")
        return [*lines, title]

    anim = animation.FuncAnimation(fig, update, frames=len(shown), blit=False)
    anim.save(path, writer=writer, dpi=80)
    plt.close(fig)
    return path
