"""CMU motion capture in its native ASF/AMC format: parser, forward kinematics, mapping to H36M-17.

Input: a folder (searched recursively) with, per subject, `<subject>.asf` (skeleton) and `<subject>_<trial>.amc`
(motions) beside it. One sequence = (subject, trial, virtual camera).

- ASF: `:units` (`length 0.45` -> metres = value / 0.45 * 0.0254; `angle deg`), `:root` (`order`, `axis`),
  `:bonedata` (per bone: name, unit `direction`, `length`, `axis ax ay az XYZ`, `dof`), `:hierarchy`.
- AMC: `:FULLY-SPECIFIED`/`:DEGREES` headers, then per frame its number and one line per bone:
  `root tx ty tz rx ry rz`, `<bone> <one value per dof>` (degrees).
- Forward kinematics (the Acclaim convention, as in CMU's own amc viewers): C = Rz(az) Ry(ay) Rx(ax) from a
  bone's `axis`, M = Rz(rz) Ry(ry) Rx(rx) from its dofs, global L_bone = L_parent C M C^-1, and the bone's end
  = its start + length * L_bone direction. Root: position (tx, ty, tz), rotation C_root M_root C_root^-1.
- World: ASF/AMC is y up; we rotate to z up ((x, y, z) -> (x, -z, y)), metres, and shift the floor so the
  lowest ankle in a typical frame (median) is 8 cm above z = 0.
- 120 fps -> `fps` (default 50) by linear interpolation of joint positions at t = k / fps.

Mapping CMU -> H36M-17 (a joint is the END of the named bone; pelvis is the root):

    pelvis root          r_hip   rhipjoint   r_knee rfemur   r_ankle rtibia
    spine  upperback     l_hip   lhipjoint   l_knee lfemur   l_ankle ltibia
    thorax thorax (where the clavicles start)    neck upperneck     head head (top of the head)
    l_shoulder lclavicle  l_elbow lhumerus  l_wrist lradius   (and r_* the same)

CMU's spine is shorter than the H36M skeleton's relative to the legs (its thorax point sits lower), so
proportions differ a little from H36M's: a known, documented difference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2ot.skeleton import NUM_JOINTS
from pipelines.config import PreprocessConfig
from pipelines.records import BadSequence, PipelineError, RawSequence, SeqKey, resampled_frames
from pipelines.sources.base import Plan, Source, virtual_cameras

CMU_FPS = 120.0
INCH_M = 0.0254
FLOOR_ANKLE_M = 0.08
# H36M-17 joint -> CMU bone whose end it is ("root": the root position).
CMU_TO_H36M: tuple[str, ...] = (
    "root", "rhipjoint", "rfemur", "rtibia", "lhipjoint", "lfemur", "ltibia", "upperback", "thorax",
    "upperneck", "head", "lclavicle", "lhumerus", "lradius", "rclavicle", "rhumerus", "rradius",
)
ROOT_CHANNELS = ("TX", "TY", "TZ", "RX", "RY", "RZ")
BONE_DOFS = ("rx", "ry", "rz", "tx", "ty", "tz", "l")
MAX_BONES = 500  # CMU skeletons have 31
MAX_BONE_UNITS = 1e4  # a bone length in ASF units (CMU's longest is about 7)
MAX_AMC_VALUE = 1e6  # degrees or ASF length units
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass
class Bone:
    name: str
    direction: np.ndarray
    length: float
    axis: np.ndarray  # degrees
    axis_order: str
    dof: list[str]
    parent: str | None = None


@dataclass
class AsfSkeleton:
    length_unit: float  # ASF `:units length` (0.45 for CMU)
    angle_deg: bool
    root_order: list[str]
    root_axis: str
    bones: dict[str, Bone] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # parents before children


def _rot(axis: str, angle: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] about x/y/z by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    o, z = np.ones_like(angle), np.zeros_like(angle)
    rows = {"x": ((o, z, z), (z, c, -s), (z, s, c)), "y": ((c, z, s), (z, o, z), (-s, z, c)),
            "z": ((c, -s, z), (s, c, z), (z, z, o))}[axis]
    return np.stack([np.stack(r, -1) for r in rows], -2)


def euler_matrix(angles_rad: np.ndarray, order: str = "XYZ") -> np.ndarray:
    """Acclaim Euler rotation [..., 3, 3]: for order "XYZ", Rz @ Ry @ Rx (x applied first)."""
    out = None
    for ax in order.lower():
        r = _rot(ax, angles_rad[..., "xyz".index(ax)])
        out = r if out is None else r @ out
    return out


def _fail(path: str, lineno: int, msg: str):
    raise BadSequence(f"{path}:{lineno}: {msg}")


def parse_asf(path: str | Path) -> AsfSkeleton:
    """Parse an ASF skeleton file; BadSequence naming file:line on malformed content."""
    path = str(path)
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        raise BadSequence(f"{path}: unreadable ASF ({e})") from None
    skel = AsfSkeleton(length_unit=1.0, angle_deg=True, root_order=["TX", "TY", "TZ", "RX", "RY", "RZ"],
                       root_axis="XYZ")
    section, bone, hierarchy = None, None, []
    for i, raw in enumerate(lines, 1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith(":"):
            section = line.split()[0][1:].lower()
            continue
        tok = line.split()
        try:
            if section == "units":
                if tok[0] == "length":
                    skel.length_unit = _finite(tok[1], "units length", positive=True)
                elif tok[0] == "angle":
                    skel.angle_deg = tok[1].lower().startswith("deg")
            elif section == "root":
                if tok[0] == "order":
                    skel.root_order = [t.upper() for t in tok[1:]]
                    if sorted(skel.root_order) != sorted(ROOT_CHANNELS):
                        raise ValueError(f"root order {' '.join(tok[1:])!r} is not an order of "
                                         f"{' '.join(ROOT_CHANNELS)}")
                elif tok[0] == "axis":
                    skel.root_axis = _axis_order(tok[1], "root axis")
            elif section == "bonedata":
                if tok[0] == "begin":
                    bone = {"dof": []}
                elif tok[0] == "end":
                    if bone is None or "name" not in bone or "length" not in bone or "direction" not in bone:
                        _fail(path, i, "bone without name/direction/length")
                    if bone["name"] == "root" or bone["name"] in skel.bones:
                        _fail(path, i, f"bone name {bone['name']!r} used twice (or named root)")
                    if len(skel.bones) >= MAX_BONES:
                        _fail(path, i, f"more than {MAX_BONES} bones")
                    skel.bones[bone["name"]] = Bone(bone["name"], bone["direction"], bone["length"],
                                                    bone.get("axis", np.zeros(3)), bone.get("order", "XYZ"),
                                                    bone["dof"])
                    bone = None
                elif bone is not None:
                    if tok[0] == "name":
                        bone["name"] = tok[1]
                    elif tok[0] == "direction":
                        if len(tok) < 4:
                            raise ValueError("direction needs 3 numbers")
                        bone["direction"] = np.array([_finite(v, "direction") for v in tok[1:4]])
                    elif tok[0] == "length":
                        bone["length"] = _finite(tok[1], "length")
                        if not 0 <= bone["length"] <= MAX_BONE_UNITS:
                            raise ValueError(f"length {tok[1]} out of [0, {MAX_BONE_UNITS:g}]")
                    elif tok[0] == "axis":
                        if len(tok) < 4:
                            raise ValueError("axis needs 3 angles")
                        bone["axis"] = np.array([_finite(v, "axis") for v in tok[1:4]])
                        bone["order"] = _axis_order(tok[4], "axis order") if len(tok) > 4 else "XYZ"
                    elif tok[0] == "dof":
                        bone["dof"] = [t.lower() for t in tok[1:]]
                        unknown = [d for d in bone["dof"] if d not in BONE_DOFS]
                        if unknown:
                            raise ValueError(f"unknown dof {unknown[0]!r} (known: {' '.join(BONE_DOFS)})")
            elif section == "hierarchy":
                if tok[0] not in ("begin", "end"):
                    hierarchy.append((i, tok))
        except BadSequence:
            raise
        except (ValueError, IndexError) as e:
            _fail(path, i, f"malformed line {raw.strip()!r} ({e})")
    if not skel.bones:
        raise BadSequence(f"{path}: no :bonedata in the ASF")
    children = _hierarchy(path, skel, hierarchy)
    seen = {"root"}
    queue = ["root"]
    while queue:  # breadth first; terminates: every bone enters the queue at most once
        name = queue.pop(0)
        if name != "root":
            skel.order.append(name)
        for child in children.get(name, []):
            if child in seen:
                raise BadSequence(f"{path}: :hierarchy has a cycle or a bone with two parents (at {child!r})")
            seen.add(child)
            queue.append(child)
    missing = [b for b in skel.bones if b not in skel.order]
    if missing:
        raise BadSequence(f"{path}: bones not reachable from root in :hierarchy: {missing[:5]}")
    return skel


def _hierarchy(path: str, skel: AsfSkeleton, lines: list[tuple[int, list[str]]]) -> dict[str, list[str]]:
    """`:hierarchy` lines -> parent -> children, each bone's parent set; one parent per bone, no self-loop."""
    children: dict[str, list[str]] = {}
    for i, tok in lines:
        parent = tok[0]
        if parent != "root" and parent not in skel.bones:
            _fail(path, i, f"hierarchy names unknown parent {parent!r}")
        for child in tok[1:]:
            if child not in skel.bones:
                _fail(path, i, f"hierarchy names unknown bone {child!r}")
            if child == parent:
                _fail(path, i, f"bone {child!r} is its own parent (a cycle)")
            if skel.bones[child].parent is not None:
                _fail(path, i, f"bone {child!r} has two parents ({skel.bones[child].parent!r}, {parent!r})")
            skel.bones[child].parent = parent
        children.setdefault(parent, []).extend(tok[1:])
    return children


def _finite(token: str, field: str, positive: bool = False) -> float:
    value = float(token)
    if not np.isfinite(value) or (positive and value <= 0):
        kind = "finite positive" if positive else "finite"
        raise ValueError(f"{field} {token!r} must be a {kind} number")
    return value


def _axis_order(token: str, field: str) -> str:
    order = token.upper()
    if sorted(order) != ["X", "Y", "Z"]:
        raise ValueError(f"{field} {token!r} is not an order of X, Y and Z")
    return order


def parse_amc(path: str | Path, skel: AsfSkeleton) -> dict[str, np.ndarray]:
    """Parse an AMC motion: bone -> [N, n_values] float64 (root: 6 values in the ASF root order)."""
    path = str(path)
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        raise BadSequence(f"{path}: unreadable AMC ({e})") from None
    frames: list[dict[str, list[float]]] = []
    current: dict[str, list[float]] | None = None
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(":"):
            continue
        tok = line.split()
        if len(tok) == 1 and tok[0].isascii() and tok[0].isdigit():
            if int(tok[0]) != len(frames) + 1:
                _fail(path, i, f"frame number {tok[0]} out of sequence (expected {len(frames) + 1})")
            current = {}
            frames.append(current)
            continue
        if current is None:
            _fail(path, i, f"motion line before the first frame number: {line[:60]!r}")
        name = tok[0]
        expected = len(skel.root_order) if name == "root" else len(skel.bones[name].dof) \
            if name in skel.bones else None
        if expected is None:
            _fail(path, i, f"unknown bone {name!r}")
        try:
            values = [float(v) for v in tok[1:]]
        except ValueError:
            _fail(path, i, f"malformed numbers in {line[:60]!r}")
        if not all(np.isfinite(v) and abs(v) <= MAX_AMC_VALUE for v in values):
            _fail(path, i, f"{name} has a value that is not finite or absurd (|value| > {MAX_AMC_VALUE:g}): "
                  f"{line[:60]!r}")
        if len(values) != expected:
            _fail(path, i, f"{name} has {len(values)} values, the ASF gives it {expected} dofs")
        current[name] = values
    if not frames:
        raise BadSequence(f"{path}: no frames in the AMC")
    if frames[-1] == {} or "root" not in frames[-1]:
        raise BadSequence(f"{path}: last frame {len(frames)} is incomplete (truncated file?)")
    out = {}
    for name in ["root"] + [b for b in skel.order if skel.bones[b].dof]:
        width = len(skel.root_order) if name == "root" else len(skel.bones[name].dof)
        arr = np.zeros((len(frames), width))
        for f, fr in enumerate(frames):
            if name in fr:
                arr[f] = fr[name]
            elif name == "root":
                raise BadSequence(f"{path}: frame {f + 1} has no root line (truncated file?)")
        out[name] = arr
    return out


def forward_kinematics(skel: AsfSkeleton, motion: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Joint positions in ASF units and axes (y up): "root" and every bone's END, each [N, 3]."""
    n = len(motion["root"])
    deg = np.pi / 180 if skel.angle_deg else 1.0
    root = motion["root"]
    idx = {k: skel.root_order.index(k) for k in skel.root_order}
    pos = {"root": np.stack([root[:, idx[a]] for a in ("TX", "TY", "TZ")], -1)}
    rot_angles = np.stack([root[:, idx[a]] for a in ("RX", "RY", "RZ")], -1) * deg
    C = euler_matrix(np.zeros(3), skel.root_axis)
    rot = {"root": C @ euler_matrix(rot_angles, skel.root_axis) @ C.T}
    for name in skel.order:
        b = skel.bones[name]
        C = euler_matrix(b.axis * deg, b.axis_order)
        angles = np.zeros((n, 3))
        for j, d in enumerate(b.dof):
            if d in ("rx", "ry", "rz"):
                angles[:, "xyz".index(d[1])] = motion[name][:, j] * deg
        local = C @ euler_matrix(angles, "XYZ") @ C.T
        parent = b.parent or "root"
        rot[name] = rot[parent] @ local
        pos[name] = pos[parent] + b.length * np.einsum("nij,j->ni", rot[name], b.direction)
    return pos


def to_h36m17(skel: AsfSkeleton, positions: dict[str, np.ndarray], fps: float) -> np.ndarray:
    """FK output -> [T, 17, 3] world metres, z up, floor at 0, resampled from 120 fps to `fps`."""
    missing = [b for b in CMU_TO_H36M if b not in positions]
    if missing:
        raise BadSequence(f"the ASF lacks bones the H36M mapping needs: {missing}")
    x = np.stack([positions[b] for b in CMU_TO_H36M], axis=1) / skel.length_unit * INCH_M
    x = x @ Y_UP_TO_Z_UP.T
    n = len(x)
    t_in = np.arange(n) / CMU_FPS
    resampled_frames(float(t_in[-1]), fps)
    t_out = np.arange(0.0, t_in[-1] + 1e-9, 1.0 / fps)
    flat = x.reshape(n, -1)
    res = np.stack([np.interp(t_out, t_in, flat[:, k]) for k in range(flat.shape[1])], -1)
    res = res.reshape(len(t_out), NUM_JOINTS, 3)
    lowest_ankle = np.minimum(res[:, 3, 2], res[:, 6, 2])
    res[..., 2] += FLOOR_ANKLE_M - np.median(lowest_ankle)
    return res.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _skeleton(path: str, mtime_ns: int) -> AsfSkeleton:
    return parse_asf(path)


@functools.lru_cache(maxsize=4)
def _trial(asf: str, amc: str, mtime_ns: int, fps: float) -> np.ndarray:
    skel = _skeleton(asf, os.stat(asf).st_mtime_ns)
    return to_h36m17(skel, forward_kinematics(skel, parse_amc(amc, skel)), fps)


def load_trial(asf: str | Path, amc: str | Path, fps: float = 50.0) -> np.ndarray:
    """One CMU trial as H36M-17 [T, 17, 3] world metres (z up) at `fps` (cached per process)."""
    return _trial(str(asf), str(amc), os.stat(amc).st_mtime_ns, fps)


def _frames_estimate(amc: Path) -> int:
    """Frames of an AMC at 120 fps from its last frame number (reads only the tail)."""
    try:
        with open(amc, "rb") as f:
            f.seek(max(0, amc.stat().st_size - 4096))
            for line in reversed(f.read().decode(errors="replace").splitlines()):
                if line.strip().isascii() and line.strip().isdigit():
                    return int(line.strip())
    except OSError:
        pass
    return 1


class CMUSource(Source):
    name = "cmu"
    default_test_subjects = ("02",)

    def plan(self, cfg: PreprocessConfig) -> Plan:
        if not cfg.input or not Path(cfg.input).is_dir():
            raise PipelineError(f"--input must be a folder of CMU <subject>.asf + .amc files, got {cfg.input!r}")
        plan = Plan(info={"synthetic": False, "fps": cfg.fps, "source_fps": CMU_FPS,
                          "mapping": dict(zip(range(NUM_JOINTS), CMU_TO_H36M))})
        asfs = sorted(Path(cfg.input).rglob("*.asf"))
        if not asfs:
            raise PipelineError(f"{cfg.input}: no .asf skeleton files found")
        for asf in asfs:
            subject = asf.stem
            plan.inputs.append(str(asf))
            for amc in sorted(asf.parent.glob(f"{subject}_*.amc")):
                plan.inputs.append(str(amc))
                frames = max(1, int(_frames_estimate(amc) * cfg.fps / CMU_FPS))
                for c in range(cfg.n_cameras):
                    plan.keys.append({"subject": subject, "action": amc.stem, "camera": f"virt{c}",
                                      "camera_index": c, "file": str(amc), "asf": str(asf), "frames": frames})
        return plan

    def load(self, key: SeqKey, cfg: PreprocessConfig) -> RawSequence:
        world = load_trial(key["asf"], key["file"], cfg.fps)
        cam = virtual_cameras(world, cfg)[key["camera_index"]]
        return RawSequence(source=self.name, subject=key["subject"], action=key["action"], camera=cam,
                           pose_3d=world, file=key["file"])
