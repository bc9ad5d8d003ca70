"""Fuzzing the readers with seeded mutations of valid files (issue 17).

For each reader (Human3.6M npz 3D and 2D, MPI-INF-3DHP npz, CMU ASF and AMC, BVH, `h2ot infer`'s keypoint
JSON / .npy / .npz), valid seed files are mutated with a seeded `random.Random`:

- `truncate`: the file cut at a random byte;
- `flip`: 1 to 8 random bytes XOR-ed with a random value;
- `extreme`: numbers replaced by NaN, +-inf, 0, -1, +-1e308, 1e999 ... (text tokens, or array elements);
- `types`: a value of the decoded structure (dict / JSON) replaced by another type or a deep nesting, keys made
  non-strings, entries deleted;
- `crafted`: attacks built on purpose (npy headers declaring 10^12 elements, zip bombs, pickles that are not an
  array, refused globals, deep JSON nesting, cyclic skeletons, absurd frame times).

Every case runs in ONE child process limited to 512 MB of address space (`resource.RLIMIT_AS`) with a 5 s
alarm per case. A case passes when the reader returns (sequences read or quarantined) or raises the project's
own error (PipelineError, KeypointError); any other exception, a time-out or a crash of the child fails the test,
naming the case. The fast test runs a few cases per reader and kind; `-m slow` runs many more
(`H2OT_FUZZ_SEED=<n>` picks other seeds).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CMU_ASF = REPO / ".." / "shared" / "data" / "cmu_asfamc" / "02" / "02.asf"
CMU_AMC = CMU_ASF.parent / "02_03.amc"
MEMORY_BYTES = 512 << 20
CASE_SECONDS = 5
EXTREMES = ("nan", "inf", "-inf", "0", "-0", "-1", "1e308", "-1e308", "1e-308", "1e999", "99999999999999999999999")
EXTREME_VALUES = (math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308, -1e308, 5e-324)
KINDS = ("truncate", "flip", "extreme", "types", "crafted")


# ------------------------------------------------------------------------------------------ valid seed files
def _walk(n: int = 60, joints: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.05, size=(joints, 3))
    base[:, 2] += 1.0
    x = np.repeat(base[None], n, axis=0)
    x[..., 1] += np.linspace(-0.5, 0.5, n)[:, None]
    return x.astype(np.float32)


def h36m_data() -> dict:
    return {"positions_3d": {"S1": {"Walking": _walk()}, "S9": {"Sitting": _walk(seed=1)}}}


def h36m_2d_data() -> dict:
    return {"positions_2d": {"S9": {"Sitting": [np.full((60, 17, 2), 500.0, np.float32) + i for i in range(4)]}}}


def mpi3dhp_data() -> dict:
    rng = np.random.default_rng(0)
    x3 = rng.normal(0, 100, size=(60, 17, 3)) + [0, 0, 4000.0]
    x2 = rng.uniform(100, 1000, size=(60, 17, 2))
    return {"data": {"TS1": {"data_3d": x3, "data_2d": x2, "valid": np.ones(60), "image_size": [2048, 2048]},
                     "TS5": {"data_3d": x3, "data_2d": x2}}}


def save_npz(target: Path | io.BytesIO, data: dict) -> None:
    """np.savez of a dict whose values are arrays or (pickled, 0-d object arrays) plain objects."""
    np.savez(target, **{str(k): v if isinstance(v, np.ndarray) else _object_array(v) for k, v in data.items()})


def bvh_text(frames: int = 40) -> str:
    names = [("Hips", None, (0, 0, 0)), ("RightUpLeg", 0, (-10, 0, 0)), ("RightLeg", 1, (0, -45, 0)),
             ("RightFoot", 2, (0, -45, 0)), ("LeftUpLeg", 0, (10, 0, 0)), ("LeftLeg", 4, (0, -45, 0)),
             ("LeftFoot", 5, (0, -45, 0)), ("Spine1", 0, (0, 23, 0)), ("Spine2", 7, (0, 25, 0)),
             ("Neck", 8, (0, 12, 0)), ("Head", 9, (0, 11, 0)), ("LeftArm", 8, (15, 0, 0)),
             ("LeftForeArm", 11, (28, 0, 0)), ("LeftHand", 12, (25, 0, 0)), ("RightArm", 8, (-15, 0, 0)),
             ("RightForeArm", 14, (-28, 0, 0)), ("RightHand", 15, (-25, 0, 0))]
    children: dict = {}
    for i, (_, parent, _) in enumerate(names):
        children.setdefault(parent, []).append(i)

    def joint(i: int, depth: int) -> list[str]:
        name, parent, off = names[i]
        pad = "  " * depth
        ch = "CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation" if parent is None \
            else "CHANNELS 3 Zrotation Xrotation Yrotation"
        out = [f"{pad}{'ROOT' if parent is None else 'JOINT'} {name}", f"{pad}{{",
               f"{pad}  OFFSET {off[0]} {off[1]} {off[2]}", f"{pad}  {ch}"]
        for c in children.get(i, []):
            out += joint(c, depth + 1)
        if i not in children:
            out += [f"{pad}  End Site", f"{pad}  {{", f"{pad}    OFFSET 0 5 0", f"{pad}  }}"]
        return out + [f"{pad}}}"]

    rows = []
    for f in range(frames):
        row = np.zeros(6 + 3 * 16)
        row[:3] = [0, 100, f * 1.0]
        row[7] = 20 * np.sin(f / 10)
        rows.append(" ".join(f"{v:.3f}" for v in row))
    return "\n".join(["HIERARCHY"] + joint(0, 0) + ["MOTION", f"Frames: {frames}", "Frame Time: 0.0333333"]
                     + rows) + "\n"


def amc_head(frames: int = 60) -> str:
    """The first `frames` frames of the shared CMU trial."""
    lines = CMU_AMC.read_text().splitlines()
    return "\n".join(lines[:lines.index(str(frames + 1))]) + "\n"


def keypoint_frames(n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    kp = rng.uniform(100, 900, size=(n, 17, 3))
    kp[..., 2] = rng.uniform(0.3, 1.0, size=(n, 17))
    return kp


def keypoints_json_data(form: int) -> object:
    kp = keypoint_frames()
    if form == 0:
        return kp[..., :2].tolist()
    if form == 1:
        return [{"keypoints": f[:, :2].tolist(), "keypoint_scores": f[:, 2].tolist()} for f in kp]
    return {"meta_info": {"dataset_name": "coco"}, "instance_info": [
        {"frame_id": t, "instances": [{"keypoints": f[:, :2].tolist(), "keypoint_scores": f[:, 2].tolist(),
                                       "bbox_score": 0.9}]} for t, f in enumerate(kp)]}


# ------------------------------------------------------------------------------------------ mutations
def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(0, max(1, len(data)))]


def flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= rng.randint(1, 255)
    return bytes(b)


NUMBER = re.compile(rb"(?<![A-Za-z_])-?\d+(\.\d+)?(e-?\d+)?")


def extreme_text(data: bytes, rng: random.Random) -> bytes:
    numbers = list(NUMBER.finditer(data))
    if not numbers:
        return flip(data, rng)
    picks = sorted(rng.sample(numbers, min(len(numbers), rng.randint(1, 4))), key=lambda m: -m.start())
    for m in picks:
        data = data[:m.start()] + rng.choice(EXTREMES).encode() + data[m.end():]
    return data


def lines_mutation(data: bytes, rng: random.Random, words: tuple[str, ...]) -> bytes:
    """Structure of a text format: a line deleted, repeated, moved, or a word replaced by a keyword."""
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    choice = rng.randrange(4)
    if choice == 0:
        del lines[i]
    elif choice == 1:
        lines[i:i] = [lines[i]] * rng.randint(1, 3)
    elif choice == 2:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    else:
        tok = lines[i].split()
        if tok:
            tok[rng.randrange(len(tok))] = rng.choice(words).encode()
        lines[i] = b" ".join(tok)
    return b"\n".join(lines)


def _deep(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


def weird_value(rng: random.Random, like: object = None, json_safe: bool = False) -> object:
    """Something of another type than expected, numeric extremes, or nesting."""
    options = [None, True, 0, -1, 1e308, math.nan, math.inf, 10**30, 10**400, "", "x" * 10, [], {},
               _deep(rng.randint(2, 60)), {"a": [1, 2]}, [1, "two", None], [[1.0, 2.0]] * 17, [1e308] * 51]
    if json_safe:
        return rng.choice(options)
    options.append(memo_bomb())  # 2**40 leaves through shared references: never to be walked
    arrays = [np.zeros(0), np.full((60, 17, 3), np.nan), np.zeros((60, 17, 3), complex), np.array("text"),
              np.zeros((2,) * 8), np.ones((60, 17, 3), bool), np.zeros((60, 17)), np.array([None, 1], dtype=object),
              np.zeros((3, 17, 3), np.float16), np.array([1920]), np.array([0, 0]), np.array([-1.0, 5.0])]
    if isinstance(like, np.ndarray) and like.dtype.kind in "fiu" and like.size:
        arr = like.astype(np.float64).copy()
        flat = arr.reshape(-1)
        idx = [rng.randrange(flat.size) for _ in range(rng.randint(1, 5))]
        flat[idx] = rng.choice(EXTREME_VALUES)
        arrays.append(arr)
        arrays.append(arr[:, :rng.randint(0, arr.shape[1])] if arr.ndim > 1 else arr[:1])
    return rng.choice(options + arrays)


def _containers(x: object, path: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(x, dict):
        out.append(path)
        for k, v in x.items():
            out += _containers(v, path + (k,))
    elif isinstance(x, list) and len(x) <= 64 and not all(isinstance(v, (int, float)) for v in x):
        out.append(path)
        for i, v in enumerate(x):
            out += _containers(v, path + (i,))
    return out


def _get(x: object, path: tuple) -> object:
    for p in path:
        x = x[p]
    return x


def mutate_types(data: object, rng: random.Random, json_safe: bool = False) -> object:
    """One change to the decoded structure: a value replaced, a key made a non-string, an entry deleted."""
    data = pickle.loads(pickle.dumps(data))
    node = _get(data, rng.choice(_containers(data)))
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return data
    k = rng.choice(keys)
    choice = rng.randrange(4)
    if choice == 0 and isinstance(node, dict):
        node[rng.choice([1, 2.5, None, True] + ([] if json_safe else [(1, 2), b"S1"]))] = node.pop(k)
    elif choice == 1:
        del node[k]
    else:
        node[k] = weird_value(rng, node[k], json_safe)
    return data


def mutate_arrays(data: object, rng: random.Random) -> object:
    """Numeric extremes inside the arrays of a decoded structure."""
    data = pickle.loads(pickle.dumps(data))
    leaves = []

    def collect(x):
        if isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, list):
            for v in x:
                collect(v)
        elif isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.size:
            leaves.append(x)

    collect(data)
    with np.errstate(over="ignore"):  # 1e308 into float32 is inf: one more extreme
        for arr in rng.sample(leaves, min(len(leaves), rng.randint(1, 3))):
            flat = arr.reshape(-1)
            value = rng.choice(EXTREME_VALUES)
            if rng.random() < 0.3:
                flat[:] = value
            else:
                flat[[rng.randrange(flat.size) for _ in range(rng.randint(1, 10))]] = value
    return data


# ------------------------------------------------------------------------------------------ crafted files
def npy_bytes(shape: tuple, descr: str = "<f8", payload: bytes = b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def zip_of(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_bomb(name: str, inflated: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(name, "w", force_zip64=True) as f:
            f.write(npy_bytes((inflated,), "|u1"))
            chunk = b"\0" * (1 << 20)
            for _ in range(inflated >> 20):
                f.write(chunk)
    return buf.getvalue()


class _Global:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


def pickle_bytes(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=3)


def memo_bomb() -> object:
    x: list = []
    for _ in range(40):
        x = [x, x]  # 2**40 leaves as a tree; a few hundred bytes pickled (memo references)
    return x


def evil_pickle() -> bytes:
    return b"cos\nsystem\n(S'true'\ntR."


def tuple_bomb() -> tuple:
    t: tuple = ()
    for _ in range(40):
        t = (t, t)
    return t


def tuple_key_bomb_pickle(depth: int = 40) -> bytes:
    """A pickle of {t: 1} where t is a tuple tree of 2**depth leaves built from memo references: unpickling it
    hashes t, which walks every leaf in C code. Written opcode by opcode, since building it in Python would hash it."""
    ops = [b"\x80\x02}", b")q\x00"]  # PROTO 2, EMPTY_DICT; EMPTY_TUPLE, BINPUT 0
    for i in range(1, depth + 1):
        ops.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i]))  # (t, t) -> memo i
    ops.append(b"h" + bytes([depth]) + b"K\x01s.")  # key t, value 1, SETITEM, STOP
    return b"".join(ops)


def crafted_structures(key: str) -> list[dict]:
    """Decoded structures whose walking, printing or converting would not end: memo bombs as values and keys,
    integers too large to print."""
    # (A tuple bomb as a dict key cannot be built here, hashing it walks its 2^40 leaves: tuple_key_bomb_pickle.)
    values, keys = [memo_bomb(), tuple_bomb(), 10**5000], [10**5000, (1, (2, 3))]
    if key == "data":
        x3 = mpi3dhp_data()["data"]["TS1"]
        return [{"data": {"TS1": {**x3, "valid": v}, "TS2": {**x3, "image_size": v}}} for v in values] + \
            [{"data": {k: x3, "TS1": x3}} for k in keys]
    if key == "keypoints":
        return [{"keypoints": v} for v in values]
    inner = {"Walking": _walk()} if key == "positions_3d" else {"Sitting": [np.zeros((60, 17, 2))] * 4}
    return [{key: {"S1": {"Walking": v}, "S9": {"Sitting": v}}} for v in values] + \
        [{key: {k: inner, "S1": {k: _walk()}}} for k in keys]


def crafted_npz(key: str, rng: random.Random) -> list[bytes]:
    """Attacks on an npz reader whose file holds `key`."""
    member = f"{key}.npy"
    structures = []
    for data in crafted_structures(key):
        buf = io.BytesIO()
        save_npz(buf, data)
        structures.append(buf.getvalue())
    return structures + [
        zip_of({member: npy_bytes((10**12, 17, 3))}),
        zip_of({member: npy_bytes((10**6, 10**6), payload=b"\0" * 80)}),
        zip_of({member: npy_bytes((2**62, 2**62))}),
        zip_of({member: npy_bytes((), "|O", pickle_bytes(memo_bomb()))}),
        zip_of({member: npy_bytes((), "|O", pickle_bytes({"S1": memo_bomb()}))}),
        zip_of({member: npy_bytes((), "|O", tuple_key_bomb_pickle())}),
        zip_of({member: npy_bytes((10**12,), "|O", evil_pickle())}),
        zip_of({member: npy_bytes((), "|O", b"\x80\x03]q\x00(" + b"h\x00" * 5000 + b"e.")}),
        zip_of({member: npy_bytes((3,), "|V1000000000", b"")}),
        zip_of({member: npy_bytes((10**9,), "|S0", b"")}),
        zip_of({member: npy_bytes((5,), "<f8", b"\0" * 40)[:30]}),
        zip_bomb(member, 64 << 20),
        zip_of({f"m{i}.npy": npy_bytes((0,)) for i in range(2000)}),
        zip_of({member: b"\x93NUMPY\x09\x00" + b"\0" * 100}),
        zip_of({member: b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 65535}),
        zip_of({member: npy_bytes((60, 17, 3), "<f8", np.full((60, 17, 3), rng.choice(EXTREME_VALUES)).tobytes())}),
    ]


def crafted_text(reader: str) -> list[bytes]:
    if reader == "bvh":
        good = bvh_text()
        deep = "HIERARCHY\n" + "".join(f"JOINT j{i}\n{{\nOFFSET 0 1 0\nCHANNELS 1 Xrotation\n" for i in range(3000)) \
            + "}\n" * 3000 + "MOTION\nFrames: 1\nFrame Time: 0.01\n" + " ".join(["0"] * 3000) + "\n"
        many = "HIERARCHY\nROOT r\n{\nOFFSET 0 0 0\nCHANNELS 0\n" + "".join(
            f"JOINT j{i}\n{{\nOFFSET 0 1 0\nCHANNELS 0\nEnd Site\n{{\nOFFSET 0 1 0\n}}\n}}\n" for i in range(5000)) \
            + "}\nMOTION\nFrames: 1\nFrame Time: 0.01\n\n"
        return [x.encode() for x in (
            good.replace("Frame Time: 0.0333333", "Frame Time: 1e300"),
            good.replace("Frame Time: 0.0333333", "Frame Time: 5e-324"),
            good.replace("Frames: 40", "Frames: 0"),
            good.replace("Frames: 40", "Frames: 99999999999999999999"),
            good.replace("Frames: 40", "Frames: -5"),
            good.replace("Xrotation", "Qrotation", 1),
            good.replace("CHANNELS 3", "CHANNELS 99999999999", 1),
            deep, many, "HIERARCHY\n" + "{\n" * 100000,
        )]
    if reader == "asf":
        good = CMU_ASF.read_text()
        return [x.encode() for x in (
            good.replace(":hierarchy\n  begin\n", ":hierarchy\n  begin\n    lfemur lfemur\n", 1),
            good.replace(":hierarchy\n  begin\n", ":hierarchy\n  begin\n    ltibia lhipjoint\n", 1),
            good.replace(":hierarchy\n  begin\n", ":hierarchy\n  begin\n    lfemur root\n", 1),
            good.replace("order TX TY TZ RX RY RZ", "order TX TX TX TX TX TX"),
            good.replace("axis XYZ", "axis XXX", 1),
            good.replace("length 0.45", "length -1"),
            good.replace("length 0.45", "length nan"),
        )]
    if reader == "amc":
        head = amc_head()
        return [x.encode() for x in (
            head.replace("\n1\n", "\n99999999999999999999999\n", 1),
            head.replace("\n1\n", "\n¹\n", 1),
            head + "\n" + "\n".join(f"{i}" for i in range(200, 20000)),
        )]
    return []


def crafted_json() -> list[bytes]:
    good = keypoints_json_data(2)
    bad_fields = [
        {"instance_info": [{"instances": [{"keypoints": "abc"}]}]},
        {"instance_info": [{"instances": [{"keypoints": {"x": 1}}]}]},
        {"instance_info": [{"instances": "x"}]},
        {"instance_info": [{"instances": [{"keypoints": [[1, 2]] * 17, "bbox_score": [1]}]}]},
        {"instance_info": [{"instances": [{"keypoints": [[1, 2]] * 17, "keypoint_scores": "high"}]}]},
        {"keypoints": [[[10**400, 1]] * 17]},
        {"instance_info": "frames"},
        [{"keypoints": [[1, 2]] * 17, "keypoint_scores": [{"s": 1}] * 17}],
        [[[True, False]] * 17] * 3,
        [[[1e308, -1e308, 1e308]] * 17] * 3,
    ]
    texts = ["[" * 200000 + "]" * 200000, '{"keypoints":' * 100000 + "1" + "}" * 100000,
             json.dumps(good).replace("0.9", "1e999"), "[" + "[1, 2]," * 10 + "]", '{"keypoints": NaN}']
    return [json.dumps(x).encode() for x in bad_fields] + [t.encode() for t in texts]


def crafted_npy() -> list[bytes]:
    return [npy_bytes((10**12, 17, 3)), npy_bytes((2**40, 2**40)), npy_bytes((30, 17, 2), "|O", evil_pickle()),
            npy_bytes((30, 17, 2), "<U10", b"\0" * 30 * 17 * 2 * 40), npy_bytes((30, 17, 2), "<c16", b"\0" * 16320),
            npy_bytes((1,), "|V99999999999"), b"\x93NUMPY\x02\x00\xff\xff\xff\x7f" + b"{" * 1000,
            npy_bytes((3,)).replace(b"(3,)", b"(3, "),  # found by the long run: numpy's tokenizer error
            npy_bytes((30, 17, 2), "<f8", np.full((30, 17, 2), 1e308).tobytes())]


# ------------------------------------------------------------------------------------------ case generation
def _structured_cases(reader: str, data: dict, kind: str, rng: random.Random, key: str) -> list[bytes]:
    def npz_bytes(d: dict) -> bytes:
        buf = io.BytesIO()
        save_npz(buf, d)  # type: ignore[arg-type]
        return buf.getvalue()

    if kind in ("truncate", "flip"):
        mutation = truncate if kind == "truncate" else flip
        if rng.random() < 0.5:  # the archive's bytes (mostly caught by zip's CRC) ...
            return [mutation(npz_bytes(data), rng)]
        return [inside_members(npz_bytes(data), mutation, rng)]  # ... or a member's, re-zipped with a valid CRC
    if kind == "extreme":
        return [npz_bytes(mutate_arrays(data, rng))]
    if kind == "types":
        return [npz_bytes(mutate_types(data, rng))]
    return []


def inside_members(npz: bytes, mutation, rng: random.Random) -> bytes:
    """`mutation` applied to one member's bytes (npy header, data or pickle), then zipped again."""
    with zipfile.ZipFile(io.BytesIO(npz)) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    name = rng.choice(sorted(members))
    members[name] = mutation(members[name], rng)
    return zip_of(members)


def _text_cases(data: bytes, kind: str, rng: random.Random, words: tuple[str, ...]) -> list[bytes]:
    if kind == "truncate":
        return [truncate(data, rng)]
    if kind == "flip":
        return [flip(data, rng)]
    if kind == "extreme":
        return [extreme_text(data, rng)]
    if kind == "types":
        return [lines_mutation(data, rng, words)]
    return []


BVH_WORDS = ("{", "}", "JOINT", "ROOT", "End", "OFFSET", "CHANNELS", "MOTION", "Frames:", "HIERARCHY", "Xposition")
ASF_WORDS = ("begin", "end", ":hierarchy", ":bonedata", "root", "dof", "axis", "limits", "lfemur", "order", "XYZ")
AMC_WORDS = ("root", "lfemur", ":DEGREES", "1", "unknownbone", "rtibia")


def make_cases(reader: str, kind: str, n: int, seed: int, folder: Path) -> list[dict]:
    """`n` case files of `reader` for mutation `kind` (crafted: all of them), written under `folder`."""
    rng = random.Random(f"{reader}/{kind}/{seed}")
    blobs: list[bytes] = []
    for i in range(n if kind != "crafted" else 1):
        if reader == "h36m":
            blobs += crafted_npz("positions_3d", rng) if kind == "crafted" else \
                _structured_cases(reader, h36m_data(), kind, rng, "positions_3d")
        elif reader == "h36m_2d":
            blobs += crafted_npz("positions_2d", rng) if kind == "crafted" else \
                _structured_cases(reader, h36m_2d_data(), kind, rng, "positions_2d")
        elif reader == "3dhp":
            blobs += crafted_npz("data", rng) if kind == "crafted" else \
                _structured_cases(reader, mpi3dhp_data(), kind, rng, "data")
        elif reader == "bvh":
            blobs += crafted_text("bvh") if kind == "crafted" else \
                _text_cases(bvh_text().encode(), kind, rng, BVH_WORDS)
        elif reader == "asf":
            blobs += crafted_text("asf") if kind == "crafted" else \
                _text_cases(CMU_ASF.read_bytes(), kind, rng, ASF_WORDS)
        elif reader == "amc":
            amc = amc_head().encode()
            blobs += crafted_text("amc") if kind == "crafted" else _text_cases(amc, kind, rng, AMC_WORDS)
        elif reader == "kp_json":
            text = json.dumps(keypoints_json_data(i % 3)).encode()
            if kind == "crafted":
                blobs += crafted_json()
            elif kind == "types":
                blobs.append(json.dumps(mutate_types(keypoints_json_data(i % 3), rng, json_safe=True)).encode())
            else:
                blobs += _text_cases(text, kind, rng, ("null", "[]", "{}", '"x"', "true"))
        elif reader == "kp_npy":
            buf = io.BytesIO()
            np.save(buf, keypoint_frames())
            if kind == "crafted":
                blobs += crafted_npy()
            elif kind == "types":
                weird = weird_value(rng, keypoint_frames())
                arr = weird if isinstance(weird, np.ndarray) else _object_array(weird)
                b = io.BytesIO()
                np.save(b, arr, allow_pickle=True)
                blobs.append(b.getvalue())
            elif kind == "extreme":
                b = io.BytesIO()
                np.save(b, mutate_arrays({"k": keypoint_frames()}, rng)["k"])
                blobs.append(b.getvalue())
            else:
                blobs += _text_cases(buf.getvalue(), kind, rng, ())
        elif reader == "kp_npz":
            if kind == "crafted":
                blobs += crafted_npz("keypoints", rng)
            else:
                data = {"keypoints": keypoint_frames()}
                if kind == "types":
                    data = {"keypoints": weird_value(rng, keypoint_frames()), **({"other": np.zeros(3)}
                                                                                 if rng.random() < 0.3 else {})}
                    blobs.append(_npz_any(data))
                else:
                    blobs += _structured_cases(reader, data, kind, rng, "keypoints")
    cases = []
    for j, blob in enumerate(blobs):
        path = _case_path(folder, reader, kind, seed, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        cases.append({"id": f"{reader}/{kind}/{seed}/{j}", "reader": reader, "kind": kind,
                      "path": str(path), "base": str(folder / "base")})
    return cases


def _npz_any(data: dict) -> bytes:
    buf = io.BytesIO()
    arrays = {k: (v if isinstance(v, np.ndarray) else _object_array(v)) for k, v in data.items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


def _object_array(value: object) -> np.ndarray:
    """`value` in a 0-d object array (how np.savez stores a Python object), whatever its nesting."""
    holder = np.empty((), dtype=object)
    holder[()] = value
    return holder


def _case_path(folder: Path, reader: str, kind: str, seed: int, j: int) -> Path:
    name = f"{kind}_{seed}_{j}"
    if reader in ("asf", "amc"):
        return folder / reader / name / "cmu" / "02" / ("02.asf" if reader == "asf" else "02_03.amc")
    if reader == "bvh":
        return folder / reader / name / "subj" / "take.bvh"
    suffix = {"kp_json": ".json", "kp_npy": ".npy"}.get(reader, ".npz")
    return folder / reader / f"{name}{suffix}"


def write_bases(folder: Path) -> None:
    """The valid partner files some cases need (h36m_2d's 3D; the ASF beside a mutated AMC, and vice versa)."""
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    save_npz(base / "h36m_3d.npz", h36m_data())
    if CMU_ASF.is_file():
        (base / "02.asf").write_bytes(CMU_ASF.read_bytes())
        (base / "02_03.amc").write_text(amc_head())


# ------------------------------------------------------------------------------------------ the child process
def read_case(case: dict) -> str:
    """Run the reader on one case file: 'read N', 'quarantined N', 'rejected' (the project's errors) or raise."""
    reader, path = case["reader"], Path(case["path"])
    if reader.startswith("kp_"):
        from h2ot.keypoints import KeypointError, load_sequence, model_input

        try:
            kp, _ = load_sequence(path, "coco17")
        except KeypointError:
            return "rejected"
        x = model_input(kp, 1000, 1000, 3)
        if not np.isfinite(x).all():
            raise AssertionError("keypoints accepted, but the model input is not finite")
        return "read 1"
    from pipelines.build import assign_splits, get_source
    from pipelines.config import PreprocessConfig
    from pipelines.records import BadSequence, PipelineError
    from pipelines.sources.base import plan_checked, read_sequence

    base = Path(case["base"])
    options: dict = {"n_cameras": 1, "frames": 27, "stride": 27, "progress": False, "use_ray": False}
    if reader in ("h36m", "3dhp"):
        options.update(source="h36m" if reader == "h36m" else "3dhp", input=str(path))
    elif reader == "h36m_2d":
        options.update(source="h36m", input=str(base / "h36m_3d.npz"), input_2d=str(path))
    elif reader == "bvh":
        options.update(source="bvh", input=str(path.parent.parent))
    else:
        folder = path.parent
        partner = "02_03.amc" if reader == "asf" else "02.asf"
        if not (folder / partner).exists():
            (folder / partner).write_bytes((base / partner).read_bytes())
        options.update(source="cmu", input=str(folder.parent))
    cfg = PreprocessConfig(**options)
    source = get_source(cfg.source)
    try:
        plan = plan_checked(source, cfg)
        assign_splits(plan, cfg, source)
        read = 0
        quarantined = len(plan.quarantine)
        for key in plan.keys:
            try:
                prep = read_sequence(source, key, cfg)
            except BadSequence:
                quarantined += 1
                continue
            for name in ("pose_2d", "conf_2d", "pose_3d"):
                if not np.isfinite(getattr(prep, name)).all():
                    raise AssertionError(f"sequence accepted, but its {name} is not finite")
            read += 1
    except PipelineError:
        return "rejected"
    return f"read {read}" if not quarantined else f"quarantined {quarantined} read {read}"


def child_main(spec_path: str, out_path: str) -> None:
    import resource
    import signal
    import time

    class CaseTimeout(BaseException):
        pass

    def on_alarm(*_):
        raise CaseTimeout()

    import h2ot.keypoints  # noqa: F401  (imported before the clock starts: the readers' cost, not Python's)
    import pipelines.build  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    signal.signal(signal.SIGALRM, on_alarm)
    cases = json.loads(Path(spec_path).read_text())
    with open(out_path, "w") as out:
        for case in cases:
            out.write(json.dumps({"start": case["id"]}) + "\n")
            out.flush()
            t0 = time.perf_counter()
            signal.alarm(CASE_SECONDS)
            try:
                outcome = read_case(case)
            except CaseTimeout:
                outcome = f"FAIL: more than {CASE_SECONDS} s"
            except BaseException as e:  # noqa: BLE001 - any foreign exception is what we look for
                outcome = f"FAIL: {type(e).__name__}: {str(e)[:300]}"
            finally:
                signal.alarm(0)
            out.write(json.dumps({"id": case["id"], "reader": case["reader"], "kind": case["kind"],
                                  "outcome": outcome, "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
            out.flush()


# ------------------------------------------------------------------------------------------ the tests
READERS = ("h36m", "h36m_2d", "3dhp", "bvh", "asf", "amc", "kp_json", "kp_npy", "kp_npz")


def run_fuzz(tmp_path: Path, per_kind: int, seeds: range) -> list[dict]:
    readers = [r for r in READERS if r not in ("asf", "amc") or CMU_ASF.is_file()]
    write_bases(tmp_path)
    cases = []
    for reader in readers:
        for kind in KINDS:
            for seed in seeds[:1] if kind == "crafted" else seeds:
                cases += make_cases(reader, kind, per_kind, seed, tmp_path)
    spec, out = tmp_path / "cases.json", tmp_path / "results.jsonl"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(spec), str(out)], env=env, capture_output=True,
                          text=True, timeout=60 + 2 * CASE_SECONDS * len(cases))
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    results = [x for x in lines if "outcome" in x]
    if proc.returncode != 0 or len(results) != len(cases):
        started = [x["start"] for x in lines if "start" in x]
        pytest.fail(f"the fuzz child died (exit {proc.returncode}) during case {started[-1] if started else '?'}: "
                    f"{proc.stderr[-2000:]}")
    _report(results)
    return results


def _report(results: list[dict]) -> None:
    table = Counter((r["reader"], r["kind"], r["outcome"].split()[0]) for r in results)
    print(f"\nfuzz: {len(results)} cases, slowest {max(r['seconds'] for r in results):.2f} s")
    for reader in READERS:
        for kind in KINDS:
            row = {o: n for (rd, kd, o), n in table.items() if rd == reader and kd == kind}
            if row:
                print(f"  {reader:8s} {kind:9s} " + " ".join(f"{o}={n}" for o, n in sorted(row.items())))


def _failures(results: list[dict]) -> list[str]:
    return [f"{r['id']}: {r['outcome']}" for r in results if r["outcome"].startswith("FAIL")]


def test_fuzz_readers_fast(tmp_path):
    results = run_fuzz(tmp_path, per_kind=3, seeds=range(1))
    assert not _failures(results), "\n".join(_failures(results)[:20])
    assert all(r["seconds"] < CASE_SECONDS for r in results)
    # the mutations do reach the readers' checks: some cases are read, others refused or quarantined
    outcomes = Counter(r["outcome"].split()[0] for r in results)
    assert outcomes["rejected"] > 0 and outcomes["read"] > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_readers_long(tmp_path):
    first = int(os.environ.get("H2OT_FUZZ_SEED", "0"))  # another value explores other mutations
    results = run_fuzz(tmp_path, per_kind=25, seeds=range(first, first + 8))
    assert not _failures(results), "\n".join(_failures(results)[:40])


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
