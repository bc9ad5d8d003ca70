"""Bounded reading of `.npy` / `.npz` files: nothing is allocated before the file proves it holds it.

`np.load` trusts a file's header: a few hundred bytes can declare a 10^12-element array, which numpy allocates
before it reads a byte of data, and a zip member can inflate to gigabytes. Here every size is checked first:

- an `.npz` member's declared (inflated) size must stay under `MAX_ARRAY_BYTES`, and a large member may not
  inflate more than `MAX_INFLATE_RATIO` times its compressed size (pose data compresses a few times, a zip bomb
  a thousand); members are inflated in bounded steps, never past their declared size;
- an `.npy` header's shape x itemsize must equal the bytes that follow it (and stay under the bound);
- object (pickled) members are handed to the caller's `unpickle`, or refused.

Errors are `ArrayFileError` (a ValueError) naming the file and member; callers turn it into their own type.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MAX_ARRAY_BYTES = int(os.environ.get("H2OT_MAX_ARRAY_BYTES", 4 << 30))  # one array / member, inflated
MAX_INFLATE_RATIO = 200  # inflated / compressed, for members above RATIO_CHECK_BYTES
RATIO_CHECK_BYTES = 16 << 20
MAX_MEMBERS = 10_000
MAX_HEADER_BYTES = 10_000  # numpy's own limit for .npy headers
READ_STEP = 1 << 22
# What zipfile raises on a damaged archive besides BadZipFile (encrypted members: RuntimeError; bad names:
# UnicodeDecodeError; unknown compression: NotImplementedError; a damaged deflate stream: zlib.error).
ZIP_ERRORS = (EOFError, OSError, zipfile.LargeZipFile, NotImplementedError, UnicodeDecodeError, zlib.error,
              struct.error)
# Plain dtypes an array file may hold: booleans, integers, floats, complex, byte and unicode strings.
PLAIN_KINDS = "biufcSU"


Unpickle = Callable[[io.BytesIO, str], Any]  # (stream after the header, "file: member") -> the object array


class ArrayFileError(ValueError):
    """The file is not a readable array file within the bounds; the message names file and member."""


def _npy_header(buf: io.BytesIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(buf)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = readers[version](buf, max_header_size=MAX_HEADER_BYTES)
    except Exception as e:  # numpy parses the header with tokenize/ast: ValueError, SyntaxError, TokenError ...
        raise ArrayFileError(f"{where} is not a valid .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArrayFileError(f"{where}: invalid shape {shape!r} in the .npy header")
    return shape, bool(fortran), dtype


def parse_npy(data: bytes, where: str, unpickle: Unpickle | None = None) -> Any:
    """The array of one `.npy` file's bytes. Plain dtypes only, unless `unpickle` reads object arrays.

    The header's shape x itemsize must equal the bytes after it (checked before allocating anything).
    """
    buf = io.BytesIO(data)
    shape, fortran, dtype = _npy_header(buf, where)
    if dtype.hasobject:
        if unpickle is None:
            raise ArrayFileError(f"{where} holds pickled objects, which are not loaded; save a numeric array")
        return unpickle(buf, where)
    if dtype.kind not in PLAIN_KINDS or dtype.itemsize == 0 or dtype.fields is not None:
        raise ArrayFileError(f"{where} has dtype {dtype}, expected numbers or strings")
    declared = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    payload = len(data) - buf.tell()
    if declared > MAX_ARRAY_BYTES:
        raise ArrayFileError(f"{where} declares shape {shape} of {dtype} ({declared:.3g} bytes), above the "
                             f"limit of {MAX_ARRAY_BYTES:.3g} bytes")
    if declared != payload:
        raise ArrayFileError(f"{where} declares shape {shape} of {dtype} ({declared} bytes) but holds {payload} "
                             "bytes of data: truncated or corrupt")
    order = "F" if fortran else "C"
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=buf.tell()).reshape(
        shape, order=order).copy()


def read_npy_file(path: str | Path, unpickle: Unpickle | None = None) -> Any:
    """A `.npy` file's array (size-checked, see `parse_npy`)."""
    size = os.path.getsize(path)
    if size > MAX_ARRAY_BYTES + MAX_HEADER_BYTES:
        raise ArrayFileError(f"{path}: {size} bytes, above the limit of {MAX_ARRAY_BYTES:.3g} bytes")
    with open(path, "rb") as f:
        data = f.read()
    return parse_npy(data, str(path), unpickle)


def _member_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    where = f"{path}: member {info.filename}"
    if info.file_size > MAX_ARRAY_BYTES:
        raise ArrayFileError(f"{where} inflates to {info.file_size:.3g} bytes, above the limit of "
                             f"{MAX_ARRAY_BYTES:.3g} bytes")
    if info.file_size > RATIO_CHECK_BYTES and info.file_size > MAX_INFLATE_RATIO * max(1, info.compress_size):
        raise ArrayFileError(f"{where} inflates {info.file_size / max(1, info.compress_size):.0f} times "
                             f"(to {info.file_size:.3g} bytes): a zip bomb, not array data")
    chunks, total = [], 0
    with zf.open(info) as f:
        while total < info.file_size:
            chunk = f.read(min(READ_STEP, info.file_size - total))  # inflates at most this much
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def _array_name(member: str) -> str:
    return member[:-4] if member.endswith(".npy") else member


def read_npz_file(path: str | Path, unpickle: Unpickle | None = None,
                  only: Callable[[list[str]], list[str]] | None = None) -> dict[str, Any]:
    """The members of an `.npz` file as {name without .npy: array} (bounded, see the module docstring): every
    member, or those `only(names)` picks from the array names."""
    path = str(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise ArrayFileError(f"{path}: {len(infos)} members, more than {MAX_MEMBERS}")
            wanted = set(only([_array_name(i.filename) for i in infos])) if only else None
            for info in infos:
                name = _array_name(info.filename)
                if wanted is not None and name not in wanted:
                    continue
                data = _member_bytes(zf, info, path)
                out[name] = parse_npy(data, f"{path}: member {info.filename}", unpickle)
                del data
        return out
    except zipfile.BadZipFile as e:
        raise ArrayFileError(f"{path}: not an npz file (not a readable zip archive: {e}); "
                             "truncated download?") from None
    except MemoryError:
        raise ArrayFileError(f"{path}: does not fit in memory") from None
    except ZIP_ERRORS as e:
        raise ArrayFileError(f"{path}: truncated or unreadable npz ({type(e).__name__}: {e})") from None
