"""Synthetic human motion for demos and tests: a kinematic H36M-17 skeleton with human bone lengths.

Every sequence is labelled `source = "synthetic"` (and `synthetic: true` in the manifest): it is never
Human3.6M. Subjects `SYN1..SYNn` differ in size (x0.88..1.12 of the H36M bone lengths) and style
(cadence, arm swing, lean); actions:

- `Walking`: gait cycles (hip flexion, knee flexion peaking in swing, arms swinging opposite to the legs,
  pelvis bob twice per stride, a little pelvis yaw and trunk sway) along a curved path; the speed follows from
  the stride so the stance foot does not skate.
- `Running`: the same with a faster cadence, larger angles, more knee and elbow flexion, forward lean.
- `Gestures`: standing, both arms doing waves, reaches and raises with smooth random timing, weight shifts.
- `Turning`: standing, turning on the spot to random headings with small steps, looking around.

All poses are world metres, z up, floor at z = 0, facing +y at heading 0; 50 fps by default.
"""

from __future__ import annotations

import functools

import numpy as np

from h2ot.skeleton import NUM_JOINTS
from pipelines.config import PreprocessConfig
from pipelines.records import RawSequence, SeqKey, sequence_rng
from pipelines.sources.base import Plan, Source, virtual_cameras

ACTIONS = ("Walking", "Running", "Gestures", "Turning")

# H36M bone lengths, metres (the standard skeleton of the shared H36M release).
HIP_OFFSET = 0.1329
THIGH = 0.4429
SHANK = 0.4542
ANKLE_HEIGHT = 0.08
SPINE = 0.2334
CHEST = 0.2571
NECK = 0.1211
HEAD = 0.1150
SHOULDER_OFFSET = 0.1510
UPPER_ARM = 0.2789
FOREARM = 0.2517


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, n_terms: int = 3, max_hz: float = 0.3) -> np.ndarray:
    """A smooth random signal in about [-1, 1]: a sum of a few slow sinusoids."""
    out = np.zeros_like(t)
    for _ in range(n_terms):
        out += np.sin(2 * np.pi * rng.uniform(0.02, max_hz) * t + rng.uniform(0, 2 * np.pi))
    return out / n_terms


def _leg(hip: np.ndarray, flex: np.ndarray, knee: np.ndarray, abd: np.ndarray, s: float):
    """Knee and ankle positions in the body frame (x right, y forward, z up) from hip flexion `flex`,
    knee flexion `knee` and outward abduction `abd` (radians; `abd` signed towards the leg's own side)."""
    thigh = np.stack([np.sin(abd), np.sin(flex) * np.cos(abd), -np.cos(flex) * np.cos(abd)], -1)
    shank_angle = flex - knee
    shank = np.stack([np.sin(abd), np.sin(shank_angle) * np.cos(abd), -np.cos(shank_angle) * np.cos(abd)], -1)
    k = hip + s * THIGH * thigh
    return k, k + s * SHANK * shank


def _arm(shoulder: np.ndarray, flex: np.ndarray, abd: np.ndarray, elbow: np.ndarray, side: float, s: float):
    """Elbow and wrist from shoulder flexion (forward), abduction (sideways up) and elbow flexion (radians)."""
    upper = np.stack([side * np.sin(abd), np.sin(flex) * np.cos(abd), -np.cos(flex) * np.cos(abd)], -1)
    fore_flex = flex + elbow
    fore = np.stack([side * np.sin(abd) * np.cos(elbow), np.sin(fore_flex) * np.cos(abd),
                     -np.cos(fore_flex) * np.cos(abd)], -1)
    fore /= np.linalg.norm(fore, axis=-1, keepdims=True)
    e = shoulder + s * UPPER_ARM * upper
    return e, e + s * FOREARM * fore


def synthesize_motion(action: str, frames: int, fps: float, rng: np.random.Generator, scale: float = 1.0,
                      style: float = 0.0) -> np.ndarray:
    """One synthetic sequence: [frames, 17, 3] world metres (z up, floor z = 0), H36M-17 joint order.

    action: one of ACTIONS; scale: body size factor on every bone; style in [-1, 1]: cadence/amplitude.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown synthetic action {action!r}; known: {ACTIONS}")
    t = np.arange(frames) / fps
    s = scale
    leg_len = s * (THIGH + SHANK)
    zeros = np.zeros_like(t)
    moving = action in ("Walking", "Running")
    if moving:
        running = action == "Running"
        cadence = (1.4 if running else 0.88) * (1 + 0.08 * style) * (1 + 0.06 * _smooth_noise(rng, t, 2, 0.1))
        phase = 2 * np.pi * np.cumsum(cadence) / fps + rng.uniform(0, 2 * np.pi)
        amp = (0.45 if running else 0.28) * (1 + 0.1 * style)  # hip flexion amplitude, rad
        # No skating: the stance foot moves back at leg_len * amp * 2 pi cadence relative to the pelvis.
        speed = leg_len * amp * 2 * np.pi * cadence * (0.85 if running else 1.0)
        hip_r = amp * np.sin(phase) + 0.05
        hip_l = amp * np.sin(phase + np.pi) + 0.05
        swing_r = np.clip(np.cos(phase), 0, None) ** 1.5  # hip moving forward = swing
        swing_l = np.clip(np.cos(phase + np.pi), 0, None) ** 1.5
        peak_knee = 1.6 if running else 1.05
        stance_knee = 0.35 if running else 0.12
        knee_r = 0.08 + peak_knee * swing_r + stance_knee * np.clip(-np.cos(phase), 0, None) * np.sin(phase) ** 2
        knee_l = 0.08 + peak_knee * swing_l + stance_knee * np.clip(np.cos(phase), 0, None) * np.sin(phase) ** 2
        bob = (0.045 if running else 0.022) * np.cos(2 * phase)
        crouch = 0.06 if running else 0.01
        pelvis_z = ANKLE_HEIGHT * s + leg_len * np.cos(amp * 0.7) - crouch + bob
        lean = (0.22 if running else 0.06) + 0.03 * style + zeros
        yaw_sway = 0.08 * np.sin(phase)  # pelvis yaw follows the legs
        arm_amp = (0.7 if running else 0.35) * (1 + 0.3 * style)
        sh_r = arm_amp * np.sin(phase + np.pi)  # right arm swings with the left leg
        sh_l = arm_amp * np.sin(phase)
        el_r = (1.5 if running else 0.25) + (0.25 if running else 0.2) * (1 + np.sin(phase + np.pi))
        el_l = (1.5 if running else 0.25) + (0.25 if running else 0.2) * (1 + np.sin(phase))
        abd_arm_r = abd_arm_l = 0.12 + zeros
        abd_leg = 0.02 + zeros
        # heading: curving path (radius 1.2-2 m) so the subject stays in the room
        radius = rng.uniform(1.5, 2.0) if running else rng.uniform(1.2, 2.0)
        turn = np.sign(rng.uniform(-1, 1)) * speed / radius * (1 + 0.25 * _smooth_noise(rng, t, 2, 0.08))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(turn) / fps
        fwd = np.stack([-np.sin(heading), np.cos(heading)], -1)
        root_xy = np.cumsum(fwd * speed[:, None], axis=0) / fps
        head_pitch = 0.1 + zeros
        trunk_roll = 0.03 * np.sin(phase)
    else:
        standing = ANKLE_HEIGHT * s + leg_len * np.cos(0.05)
        weight = _smooth_noise(rng, t, 2, 0.15)
        if action == "Gestures":
            heading = rng.uniform(0, 2 * np.pi) + 0.3 * _smooth_noise(rng, t, 2, 0.05)
            # each arm: sequences of raise/wave/reach from smooth envelopes
            env_r = np.clip(_smooth_noise(rng, t, 3, 0.35) * 2.2 + 0.3, 0, 1)
            env_l = np.clip(_smooth_noise(rng, t, 3, 0.35) * 2.2 + 0.1, 0, 1)
            wave = np.sin(2 * np.pi * rng.uniform(1.2, 2.0) * t)
            sh_r = env_r * (0.9 + 0.5 * _smooth_noise(rng, t, 2, 0.3)) + 0.05
            sh_l = env_l * (0.7 + 0.6 * _smooth_noise(rng, t, 2, 0.3)) + 0.05
            abd_arm_r = 0.15 + env_r * (0.8 + 0.3 * wave * env_r)
            abd_arm_l = 0.15 + env_l * (0.5 + 0.4 * _smooth_noise(rng, t, 2, 0.4))
            el_r = 0.3 + env_r * (0.9 + 0.5 * wave)
            el_l = 0.3 + env_l * (0.6 + 0.5 * _smooth_noise(rng, t, 2, 0.5))
            step = 0.03 * weight
        else:  # Turning
            targets = np.cumsum(rng.uniform(-2.0, 2.0, size=max(2, int(t[-1] / 2.5) + 2)))
            knots = np.linspace(0, t[-1] + 1e-6, len(targets))
            heading = np.interp(t, knots, targets)
            heading = np.convolve(np.pad(heading, 25, mode="edge"), np.ones(51) / 51, mode="valid")
            rate = np.gradient(heading) * fps
            stepping = np.clip(np.abs(rate) / 1.5, 0, 1)
            ph = 2 * np.pi * 1.6 * t
            step = stepping * 0.12 * np.sin(ph)
            sh_r = 0.1 + 0.08 * np.sin(ph + np.pi) * stepping + 0.05 * weight
            sh_l = 0.1 + 0.08 * np.sin(ph) * stepping - 0.05 * weight
            abd_arm_r = abd_arm_l = 0.12 + 0.04 * stepping
            el_r = el_l = 0.25 + 0.1 * stepping
        hip_r = 0.02 + step + 0.03 * weight
        hip_l = 0.02 - step - 0.03 * weight
        knee_r = 0.06 + np.clip(step, 0, None) * 2.0 + 0.05 * np.clip(weight, 0, None)
        knee_l = 0.06 + np.clip(-step, 0, None) * 2.0 + 0.05 * np.clip(-weight, 0, None)
        pelvis_z = standing - 0.01 * np.abs(weight) - 0.015 * (knee_r + knee_l)
        lean = 0.04 + 0.02 * _smooth_noise(rng, t, 2, 0.2)
        yaw_sway = 0.05 * weight
        abd_leg = 0.04 + 0.02 * weight
        root_xy = np.stack([0.04 * weight, 0.02 * _smooth_noise(rng, t, 2, 0.1)], -1)
        head_pitch = 0.1 + 0.25 * _smooth_noise(rng, t, 2, 0.3)
        trunk_roll = 0.03 * weight
        root_xy = root_xy @ np.array([[1.0, 0.0], [0.0, 1.0]])
        rot = np.stack([np.stack([np.cos(heading), -np.sin(heading)], -1),
                        np.stack([np.sin(heading), np.cos(heading)], -1)], -2)
        root_xy = np.einsum("tij,tj->ti", rot, root_xy)

    # --- body frame: x right, y forward, z up, pelvis at the origin (horizontally)
    n = frames
    pose = np.zeros((n, NUM_JOINTS, 3))
    pelvis = np.stack([zeros, zeros, pelvis_z], -1)
    cy, sy = np.cos(yaw_sway), np.sin(yaw_sway)
    hip_dir = np.stack([cy, sy, zeros], -1)  # pelvis yaw moves the hips
    r_hip = pelvis + s * HIP_OFFSET * hip_dir
    l_hip = pelvis - s * HIP_OFFSET * hip_dir
    r_knee, r_ankle = _leg(r_hip, hip_r, knee_r, abd_leg, s)
    l_knee, l_ankle = _leg(l_hip, hip_l, knee_l, -abd_leg, s)
    up = np.stack([np.sin(trunk_roll), np.sin(lean), np.cos(lean) * np.cos(trunk_roll)], -1)
    spine = pelvis + s * SPINE * up
    up2 = np.stack([np.sin(trunk_roll) * 0.5, np.sin(lean * 0.7), np.cos(lean * 0.7)], -1)
    thorax = spine + s * CHEST * up2
    neck_dir = np.stack([zeros, np.sin(head_pitch), np.cos(head_pitch)], -1)
    neck = thorax + s * NECK * neck_dir
    head = neck + s * HEAD * np.stack([zeros, np.sin(head_pitch * 0.5), np.cos(head_pitch * 0.5)], -1)
    cy2, sy2 = np.cos(-yaw_sway), np.sin(-yaw_sway)  # shoulders counter-rotate the pelvis
    sh_dir = np.stack([cy2, sy2, -0.05 + zeros], -1)
    r_sh = thorax + s * SHOULDER_OFFSET * sh_dir
    l_sh = thorax - s * SHOULDER_OFFSET * sh_dir + np.stack([zeros, zeros, -0.1 * s * SHOULDER_OFFSET + zeros], -1)
    r_sh[..., 2] = l_sh[..., 2]
    r_el, r_wr = _arm(r_sh, sh_r, abd_arm_r, el_r, +1.0, s)
    l_el, l_wr = _arm(l_sh, sh_l, abd_arm_l, el_l, -1.0, s)
    joints = [pelvis, r_hip, r_knee, r_ankle, l_hip, l_knee, l_ankle, spine, thorax, neck, head,
              l_sh, l_el, l_wr, r_sh, r_el, r_wr]
    for j, x in enumerate(joints):
        pose[:, j] = x
    # feet never below the floor: lift the body in frames where an ankle would dip under its height
    lowest = np.minimum(pose[:, 3, 2], pose[:, 6, 2])
    pose[..., 2] += np.clip(ANKLE_HEIGHT * s - lowest, 0, None)[:, None]
    # --- world frame: rotate by heading about z, add root motion
    c, sn = np.cos(heading), np.sin(heading)
    x, y = pose[..., 0].copy(), pose[..., 1].copy()
    pose[..., 0] = c[:, None] * x - sn[:, None] * y + root_xy[:, 0:1]
    pose[..., 1] = sn[:, None] * x + c[:, None] * y + root_xy[:, 1:2]
    pose[..., :2] -= (pose[:, 0, :2].min(0) + pose[:, 0, :2].max(0)) / 2  # path centred on the origin
    return pose.astype(np.float32)


def subject_params(subject_index: int, seed: int) -> tuple[float, float]:
    """(scale, style) of synthetic subject `SYN<i>`: sizes spread over 0.88..1.12, styles over [-1, 1]."""
    rng = np.random.default_rng([seed, 7919, subject_index])
    return float(rng.uniform(0.88, 1.12)), float(rng.uniform(-1, 1))


@functools.lru_cache(maxsize=16)
def _motion(subject: str, action: str, frames: int, fps: float, seed: int) -> np.ndarray:
    scale, style = subject_params(int(subject.removeprefix("SYN")), seed)
    return synthesize_motion(action, frames, fps, sequence_rng(seed, "synthetic", subject, action), scale, style)


class SyntheticSource(Source):
    name = "synthetic"

    def __init__(self) -> None:
        self.default_test_subjects = ()

    def plan(self, cfg: PreprocessConfig) -> Plan:
        subjects = [f"SYN{i}" for i in range(1, cfg.synthetic_subjects + 1)]
        self.default_test_subjects = (subjects[-1],) if len(subjects) > 1 else ()
        keys = [{"subject": s, "action": a, "camera": f"virt{c}", "camera_index": c, "file": "<synthetic>",
                 "frames": cfg.synthetic_frames}
                for s in subjects for a in ACTIONS for c in range(cfg.n_cameras)]
        return Plan(keys=keys, info={"synthetic": True, "actions": list(ACTIONS)})

    def load(self, key: SeqKey, cfg: PreprocessConfig) -> RawSequence:
        world = _motion(key["subject"], key["action"], cfg.synthetic_frames, cfg.fps, cfg.seed)
        cam = virtual_cameras(world, cfg)[key["camera_index"]]
        return RawSequence(source=self.name, subject=key["subject"], action=key["action"], camera=cam,
                           pose_3d=world, file="<synthetic>")
