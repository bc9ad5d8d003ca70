"""2D keypoints of a video, as detectors write them: loading, COCO-17 -> H36M-17 conversion, gap filling.

Everything here is pure numpy. Arrays are `[T, J, C]`: T frames, J = 17 joints, C = 2 (x, y pixels) or
3 (x, y pixels, detector score). A missing keypoint is NaN in x or y.

Accepted files (`load_keypoints`):

- `.npy`: one array `[T, 17, 2|3]`.
- `.npz`: the array under the key `keypoints` (`NPZ_KEY`), or the file's only array. Pickled objects are refused.
- `.json`, one of three forms:
  (a) a list of frames, each a list of 17 `[x, y]` or `[x, y, score]` (or `null` for a frame without a person);
  (b) a list of per-frame objects with a `keypoints` field of that shape, or COCO's flat `[x1, y1, v1, x2, ...]`,
      and optionally `keypoint_scores` (17 numbers);
  (c) MMPose predictions: a list of per-frame objects with `instances`, each instance having `keypoints`
      (17 `[x, y]`) and `keypoint_scores` (17); the most confident person (highest mean score) is taken, and a
      frame without instances is missing. MMPose's video output `{"meta_info": ..., "instance_info": [...]}`
      is accepted too.

COCO-17 -> H36M-17 (`coco_to_h36m`), with COCO order 0 nose, 1 l_eye, 2 r_eye, 3 l_ear, 4 r_ear,
5 l_shoulder, 6 r_shoulder, 7 l_elbow, 8 r_elbow, 9 l_wrist, 10 r_wrist, 11 l_hip, 12 r_hip, 13 l_knee,
14 r_knee, 15 l_ankle, 16 r_ankle:

- hips, knees, ankles, shoulders, elbows, wrists: copied (left stays left);
- pelvis (0) = midpoint of the hips; thorax (8) = midpoint of the shoulders; spine (7) = midpoint of pelvis
  and thorax;
- neck/nose (9) = the nose moved a quarter of the way towards the thorax (Human3.6M's joint sits between
  the nose and the base of the neck; HoT's and MHFormer's demos make the same correction);
- head (10) = centre of the eyes and ears, moved up by the eyes-minus-nose vector (about one nose-to-eyes
  distance above the eyes, towards the top of the head); missing eyes or ears are left out of their centres
  (ears are often undetected in profile), so the head is missing only without the nose or both eyes;
- scores: a copied joint keeps its score; pelvis, thorax, spine and neck/nose take the minimum score of the
  joints they are made from; head takes the mean score of the five face points (ears are often weak).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from h2ot.camera import normalize_screen_coordinates
from h2ot.npyfile import ArrayFileError, read_npy_file, read_npz_file
from h2ot.skeleton import JOINT_NAMES, NUM_JOINTS

NPZ_KEY = "keypoints"
LAYOUTS: tuple[str, ...] = ("coco17", "h36m17")
DEFAULT_MAX_GAP = 10  # frames of a joint that may be missing in a row and still be interpolated

COCO17_NAMES: tuple[str, ...] = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
    "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)
# H36M-17 joint -> the COCO-17 joint copied into it (limbs only; the torso and head are derived).
COCO_TO_H36M_COPIED: dict[int, int] = {
    1: 12, 2: 14, 3: 16,  # right hip, knee, ankle
    4: 11, 5: 13, 6: 15,  # left hip, knee, ankle
    11: 5, 12: 7, 13: 9,  # left shoulder, elbow, wrist
    14: 6, 15: 8, 16: 10,  # right shoulder, elbow, wrist
}
NECK_TOWARDS_THORAX = 0.25  # neck/nose = nose + 0.25 (thorax - nose)
MAX_JSON_BYTES = 256 << 20  # about 400 000 frames of 17 [x, y, score]; longer sequences go in .npy
MAX_JSON_DEPTH = 10  # MMPose's video output, the deepest accepted form, nests 7 levels
MAX_ABS_VALUE = 1e6  # |pixel| or |score| beyond this is not a keypoint


_MAGIC: dict[str, bytes] = {".npy": b"\x93NUMPY", ".npz": b"PK"}  # first bytes of numpy's formats (npz = zip)


class KeypointError(ValueError):
    """The keypoint input is unusable; the message says what, where (file, frame, joint) and what to do."""


# ------------------------------------------------------------------------------------------------ loading
def load_keypoints(path: str | Path) -> np.ndarray:
    """Read a keypoint file (see the module docstring for the formats) -> float64 `[T, J, C]`, C in {2, 3}.

    Only the file format is checked here; `validate_keypoints` checks the joint count and values.
    """
    path = Path(path)
    if not path.exists():
        raise KeypointError(f"{path}: no such file")
    if not path.is_file():
        raise KeypointError(f"{path}: not a file")
    suffix = path.suffix.lower()
    magic = _MAGIC.get(suffix)
    if magic is not None:
        try:
            with path.open("rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise KeypointError(f"{path}: cannot read the file ({e.strerror})") from None
        if head != magic:
            raise KeypointError(f"{path}: not a readable {suffix} file (it does not start like one)")
    if suffix == ".npy":
        arr = _load_npy(path)
    elif suffix == ".npz":
        arr = _load_npz(path)
    elif suffix == ".json":
        arr = _load_json(path)
    else:
        raise KeypointError(f"{path}: unknown keypoint file type {suffix!r}; use .npy, .npz or .json")
    return _as_float_array(arr, str(path))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return read_npy_file(path)
    except ArrayFileError as e:
        raise KeypointError(f"{e}") from None
    except MemoryError:
        raise KeypointError(f"{path}: does not fit in memory") from None


def _load_npz(path: Path) -> np.ndarray:
    def keypoint_array(names: list[str]) -> list[str]:
        if NPZ_KEY in names:
            return [NPZ_KEY]
        if len(names) == 1:
            return names
        if not names:
            raise KeypointError(f"{path}: the .npz holds no arrays")
        raise KeypointError(
            f"{path}: the .npz holds {len(names)} arrays {sorted(names)[:10]} and none is named {NPZ_KEY!r}; "
            f"save the keypoints under {NPZ_KEY!r}"
        )

    try:
        data = read_npz_file(path, only=keypoint_array)  # only the keypoints member is read
    except ArrayFileError as e:
        raise KeypointError(f"{e}") from None
    return next(iter(data.values()))


def _load_json(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise KeypointError(f"{path}: {size} bytes of JSON, above the limit of {MAX_JSON_BYTES} bytes; "
                            "save long sequences as .npy")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise KeypointError(f"{path}: cannot read the file ({e})") from None
    except json.JSONDecodeError as e:
        raise KeypointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise KeypointError(f"{path}: JSON nested too deeply (keypoint files nest at most "
                            f"{MAX_JSON_DEPTH} levels)") from None
    return parse_keypoints_json(data, source=str(path))


def _nesting_depth(data: object, limit: int) -> int:
    """Depth of nested lists/dicts (a scalar is 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_keypoints_json(data: object, source: str = "JSON") -> np.ndarray:
    """Decoded JSON in form (a), (b) or (c) (module docstring) -> `[T, J, C]` with NaN for missing frames."""
    if _nesting_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise KeypointError(f"{source}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not a keypoint file "
                            "(see docs/INFER.md for the accepted forms)")
    if isinstance(data, dict):
        if isinstance(data.get("instance_info"), list):  # MMPose video output
            data = data["instance_info"]
        elif "keypoints" in data:
            data = data["keypoints"]
        else:
            raise KeypointError(
                f"{source}: a JSON object at the top level needs 'instance_info' (MMPose) or 'keypoints'; "
                f"got keys {sorted(data)[:8]}"
            )
    if not isinstance(data, list):
        raise KeypointError(f"{source}: expected a JSON list of frames, got {type(data).__name__}")
    if not data:
        raise KeypointError(f"{source}: no frames (empty list)")
    frames: list[np.ndarray | None] = []
    for t, item in enumerate(data):
        where = f"{source}: frame {t}"
        if item is None:
            frames.append(None)
        elif isinstance(item, dict) and "instances" in item:
            frames.append(_most_confident(item["instances"], where))
        elif isinstance(item, dict) and "keypoints" in item:
            frames.append(_frame_from_object(item, where))
        elif isinstance(item, dict):
            raise KeypointError(f"{where}: an object needs a 'keypoints' or 'instances' field, got {sorted(item)[:8]}")
        else:
            frames.append(_frame_array(item, where))
    present = [f for f in frames if f is not None]
    if not present:
        raise KeypointError(f"{source}: no frame has keypoints")
    joints, channels = present[0].shape
    for t, f in enumerate(frames):
        if f is not None and f.shape != (joints, channels):
            raise KeypointError(
                f"{source}: frame {t} has shape {list(f.shape)} but frame 0's is {[joints, channels]}; "
                "every frame needs the same joints and channels"
            )
    empty = np.full((joints, channels), np.nan)
    return np.stack([empty if f is None else f for f in frames])


def _frame_array(item: object, where: str) -> np.ndarray:
    arr = _as_float_array(item, where)
    if arr.ndim == 1 and arr.size in (2 * NUM_JOINTS, 3 * NUM_JOINTS):  # COCO's flat [x1, y1, v1, ...]
        arr = arr.reshape(NUM_JOINTS, -1)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise KeypointError(
            f"{where}: keypoints must be a list of [x, y] or [x, y, score], got shape {list(arr.shape)}"
        )
    return arr


def _frame_from_object(item: dict, where: str) -> np.ndarray | None:
    if item["keypoints"] is None:
        return None
    kp = _frame_array(item["keypoints"], where)
    scores = item.get("keypoint_scores")
    if scores is not None and kp.shape[1] == 2:
        s = _as_float_array(scores, f"{where} keypoint_scores").reshape(-1)
        if s.shape[0] != kp.shape[0]:
            raise KeypointError(f"{where}: {s.shape[0]} keypoint_scores for {kp.shape[0]} keypoints")
        kp = np.concatenate([kp, s[:, None]], axis=1)
    return kp


def _most_confident(instances: object, where: str) -> np.ndarray | None:
    if not isinstance(instances, list):
        raise KeypointError(f"{where}: 'instances' must be a list, got {type(instances).__name__}")
    best, best_score = None, -np.inf
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or "keypoints" not in inst:
            raise KeypointError(f"{where}: instance {i} has no 'keypoints'")
        kp = _frame_from_object(inst, f"{where} instance {i}")
        if kp is None:
            continue
        has_scores = kp.shape[1] == 3 and not np.isnan(kp[:, 2]).all()
        score = float(np.nanmean(kp[:, 2])) if has_scores \
            else _number(inst.get("bbox_score"), f"{where} instance {i} bbox_score")
        if best is None or score > best_score:
            best, best_score = kp, score
    return best


def _number(value: object, where: str) -> float:
    """A JSON score: a finite number, or 0 when absent (None)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        shown = repr(value)[:40] if isinstance(value, (str, float)) else type(value).__name__
        raise KeypointError(f"{where} must be a finite number, got {shown}")
    return float(value)


def _as_float_array(value: object, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
        raise KeypointError(f"{where}: keypoints have dtype {value.dtype}, expected numbers")
    if isinstance(value, (str, bytes, dict)):
        raise KeypointError(f"{where}: keypoints must be numbers, got a {type(value).__name__}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise KeypointError(
            f"{where}: keypoints are not a regular numeric array (ragged lists, non-numbers or numbers "
            "too large)"
        ) from None
    return arr


# ------------------------------------------------------------------------------------------------ checks
def validate_keypoints(kp: np.ndarray, source: str = "keypoints") -> np.ndarray:
    """Check `[T, 17, 2|3]` shape and finite-or-NaN values; return it as float64. Errors name `source`."""
    kp = np.asarray(kp, dtype=np.float64)
    if kp.size == 0 or (kp.ndim >= 1 and kp.shape[0] == 0):
        raise KeypointError(f"{source}: empty input (no frames)")
    if kp.ndim == 2 and kp.shape[0] == NUM_JOINTS and kp.shape[1] in (2, 3):
        raise KeypointError(
            f"{source}: got one pose of shape {list(kp.shape)}; expected a sequence [T, 17, 2|3] (add a frame axis)"
        )
    if kp.ndim != 3:
        raise KeypointError(f"{source}: expected an array [T, 17, 2|3], got shape {list(kp.shape)}")
    if kp.shape[1] != NUM_JOINTS:
        raise KeypointError(
            f"{source}: {kp.shape[1]} joints per frame, expected {NUM_JOINTS} (COCO-17 or H36M-17); "
            f"shape {list(kp.shape)}"
        )
    if kp.shape[2] not in (2, 3):
        raise KeypointError(
            f"{source}: {kp.shape[2]} channels per joint, expected 2 (x, y) or 3 (x, y, score); "
            f"shape {list(kp.shape)}"
        )
    if np.isinf(kp).any():
        t, j = np.argwhere(np.isinf(kp))[0][:2]
        raise KeypointError(f"{source}: infinite value at frame {t}, joint {j}")
    absurd = np.abs(np.nan_to_num(kp)) > MAX_ABS_VALUE
    if absurd.any():
        t, j, c = np.argwhere(absurd)[0]
        raise KeypointError(f"{source}: absurd value {kp[t, j, c]:.3g} at frame {t}, joint {j} "
                            f"(|value| > {MAX_ABS_VALUE:g}; pixels and scores expected)")
    return kp


def fill_gaps(kp: np.ndarray, max_gap: int = DEFAULT_MAX_GAP, source: str = "keypoints") -> tuple[np.ndarray, int]:
    """Fill missing keypoints (NaN x or y) per joint: linearly between the neighbouring frames, or by repeating
    the nearest frame at the sequence ends. A run longer than `max_gap` frames is refused, naming the joint and
    the frame range. kp: [T, J, C] -> (filled copy, number of filled joint-frames). A NaN score alone becomes 0.
    """
    kp = np.array(kp, dtype=np.float64, copy=True)
    t_len, joints, channels = kp.shape
    missing = np.isnan(kp[..., :2]).any(axis=-1)  # [T, J]
    if channels == 3:
        kp[..., 2] = np.where(np.isnan(kp[..., 2]) & ~missing, 0.0, kp[..., 2])
    if not missing.any():
        return kp, 0
    if missing.all(axis=1).all():
        raise KeypointError(f"{source}: every keypoint is missing (NaN) in all {t_len} frames")
    frames = np.arange(t_len)
    for j in range(joints):
        miss = missing[:, j]
        if not miss.any():
            continue
        if miss.all():
            raise KeypointError(f"{source}: joint {j} ({JOINT_NAMES[j]}) is missing (NaN) in all {t_len} frames")
        for start, stop in _runs(miss):
            if stop - start > max_gap:
                raise KeypointError(
                    f"{source}: joint {j} ({JOINT_NAMES[j]}) is missing (NaN) in frames {start}-{stop - 1} "
                    f"({stop - start} frames in a row); at most {max_gap} can be interpolated — "
                    "cut the sequence there or raise --max-gap"
                )
        good = ~miss
        for c in range(channels):
            kp[miss, j, c] = np.interp(frames[miss], frames[good], kp[good, j, c])  # ends: nearest value
    return kp, int(missing.sum())


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1D boolean mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


# ------------------------------------------------------------------------------------------------ layouts
def coco_to_h36m(kp: np.ndarray) -> np.ndarray:
    """COCO-17 keypoints `[..., 17, C]` (C = 2 or 3, score last) -> H36M-17 `[..., 17, C]` (module docstring)."""
    kp = np.asarray(kp, dtype=np.float64)
    if kp.shape[-2] != NUM_JOINTS or kp.shape[-1] not in (2, 3):
        raise KeypointError(f"coco_to_h36m expects [..., 17, 2|3], got shape {list(kp.shape)}")
    xy = kp[..., :2]
    out = np.zeros_like(kp)
    for h36m, coco in COCO_TO_H36M_COPIED.items():
        out[..., h36m, :] = kp[..., coco, :]
    nose, eyes, face = xy[..., 0, :], _mean_present(xy[..., 1:3, :]), _mean_present(xy[..., 1:5, :])
    pelvis = xy[..., 11:13, :].mean(axis=-2)
    thorax = xy[..., 5:7, :].mean(axis=-2)
    out[..., 0, :2] = pelvis
    out[..., 8, :2] = thorax
    out[..., 7, :2] = (pelvis + thorax) / 2
    out[..., 9, :2] = nose + NECK_TOWARDS_THORAX * (thorax - nose)
    out[..., 10, :2] = face + (eyes - nose)
    if kp.shape[-1] == 3:
        s = kp[..., 2]
        out[..., 0, 2] = s[..., [11, 12]].min(axis=-1)
        out[..., 8, 2] = s[..., [5, 6]].min(axis=-1)
        out[..., 7, 2] = s[..., [5, 6, 11, 12]].min(axis=-1)
        out[..., 9, 2] = s[..., [0, 5, 6]].min(axis=-1)
        out[..., 10, 2] = s[..., 0:5].mean(axis=-1)
    return out


def _mean_present(points: np.ndarray) -> np.ndarray:
    """Mean over axis -2 of the points that are not missing: [..., K, 2] -> [..., 2]; NaN if all are missing."""
    present = ~np.isnan(points).any(axis=-1, keepdims=True)
    count = present.sum(axis=-2)
    total = np.where(present, points, 0.0).sum(axis=-2)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def to_h36m(kp: np.ndarray, layout: str) -> np.ndarray:
    """Keypoints in `layout` ("coco17" or "h36m17") -> H36M-17 order."""
    if layout == "h36m17":
        return np.asarray(kp, dtype=np.float64)
    if layout == "coco17":
        return coco_to_h36m(kp)
    raise KeypointError(f"unknown keypoint layout {layout!r}; use one of {list(LAYOUTS)}")


def model_input(kp_pixels: np.ndarray, width: int, height: int, in_channels: int) -> np.ndarray:
    """H36M-17 pixel keypoints `[T, 17, 2|3]` -> the model's input `[T, 17, in_channels]` (float32): x, y in
    VideoPose3D screen coordinates (`normalize_screen_coordinates`), plus the score when the model takes one
    (1.0 where the file had none)."""
    if width <= 0 or height <= 0:
        raise KeypointError(f"the image size must be positive, got width {width} and height {height}")
    xy = normalize_screen_coordinates(kp_pixels[..., :2], float(width), float(height))
    if in_channels == 2:
        return xy.astype(np.float32)
    if in_channels == 3:
        score = kp_pixels[..., 2:3] if kp_pixels.shape[-1] == 3 else np.ones_like(xy[..., :1])
        return np.concatenate([xy, score], axis=-1).astype(np.float32)
    raise KeypointError(f"the model takes {in_channels} input channels; only 2 (x, y) or 3 (x, y, score) exist")


def drop_low_scores(kp: np.ndarray, min_score: float) -> np.ndarray:
    """Mark keypoints whose score is below `min_score` as missing (x, y = NaN); `[T, J, 3]`. Without a score
    channel, or with min_score <= 0, the keypoints are returned unchanged."""
    if min_score <= 0 or kp.shape[-1] < 3:
        return kp
    kp = np.array(kp, dtype=np.float64, copy=True)
    kp[kp[..., 2] < min_score, :2] = np.nan
    return kp


def load_sequence(
    path: str | Path, layout: str, max_gap: int = DEFAULT_MAX_GAP, min_score: float = 0.0
) -> tuple[np.ndarray, int]:
    """Load, validate, drop keypoints scored below `min_score` (in the file's layout, so derived joints inherit the
    gap), convert to H36M-17 and fill short gaps -> (pixels `[T, 17, 2|3]`, filled joint-frames)."""
    source = str(path)
    kp = drop_low_scores(validate_keypoints(load_keypoints(path), source), min_score)
    return fill_gaps(to_h36m(kp, layout), max_gap, source)
