"""Read `.npz` files whose object arrays hold pickles, WITHOUT running code a crafted file carries.

`np.load(allow_pickle=True)` unpickles with the full `pickle` machinery: a crafted file can call any function
(`os.system`, ...). `load_npz` parses each `.npy` member itself and unpickles object arrays with
`RestrictedUnpickler`, which admits dicts, lists, tuples, strings, bytes, numbers, None/bools and numpy
arrays/dtypes/scalars (the globals numpy's own pickles use) and refuses every other global with `UnsafePickle`.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from h2ot.npyfile import ArrayFileError, read_npz_file
from pipelines.records import PipelineError

# (module, name) pairs numpy uses to pickle arrays, dtypes and scalars (numpy 1.x and 2.x spellings).
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
})


class UnsafePickle(PipelineError):
    """The file's pickle asks for something other than plain data."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only (see ALLOWED_GLOBALS)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy 2 dtype classes, e.g. Float32DType
            import numpy.dtypes

            cls = getattr(numpy.dtypes, name, None)
            if cls is not None:
                return cls
        raise UnsafePickle(f"refused to unpickle {module}.{name}: only dicts, lists, tuples, strings, numbers "
                           "and numpy arrays are allowed")


MAX_PICKLE_OBJECTS = 50_000_000  # objects a pickle may expand to, shared references counted every time
IN_PLACE_OPS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # they grow the object below them
MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def check_pickle_expansion(data: bytes | io.BytesIO, where: str, limit: int = MAX_PICKLE_OBJECTS) -> None:
    """Refuse a pickle whose objects, expanded, would number more than `limit`, before unpickling it.

    Memo references let a few hundred bytes build a tuple tree of 2**40 leaves; unpickling it is quick, but hashing
    it (a dict key) or walking it runs for hours in C code that no time limit interrupts. This walks the opcodes
    (linear in the file's size) with a stack of expanded sizes: an op's result counts itself plus what it took
    off the stack, a memo reference counts the whole object it names."""
    import pickletools

    stack: list[list[int]] = []  # one cell per stack entry: [expanded size]; memo entries share the cell
    marks: list[int] = []
    memo: dict[Any, list[int]] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in MEMO_PUT_OPS:
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in MEMO_GET_OPS:
                stack.append(memo[arg])
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            taken = 0
            before = op.stack_before
            if pickletools.markobject in before:  # everything down to the last mark (plus what lies below it)
                start = marks.pop()
                taken += sum(c[0] for c in stack[start:])
                del stack[start:]
                before = before[: before.index(pickletools.markobject)]
            popped = [stack.pop() for _ in before] if before else []
            taken += sum(c[0] for c in popped)
            if name in IN_PLACE_OPS and popped:  # the object below keeps its identity (and its memo entries)
                cell = popped[-1]
                cell[0] = min(limit + 1, cell[0] + taken - cell[0])
                stack.append(cell)
            elif op.stack_after:
                stack.append([min(limit + 1, 1 + taken)])
            if stack and stack[-1][0] > limit:
                raise PipelineError(f"{where}: its pickle expands to over {limit:,} objects (shared references); "
                                    "refused before unpickling")
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed opcode stream: any of several exception types
        raise PipelineError(f"{where} holds a truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _restricted_array(stream: io.BytesIO, where: str) -> np.ndarray:
    """An object array's pickle, unpickled by RestrictedUnpickler; it must be the ndarray `np.save` wrote."""
    start = stream.tell()
    check_pickle_expansion(stream, where)  # reads the stream in place (no copy of a 100 MB pickle) ...
    stream.seek(start)  # ... and the unpickler reads it again from the start
    try:
        obj = RestrictedUnpickler(stream, encoding="latin1").load()
    except UnsafePickle as e:
        raise UnsafePickle(f"{where}: {e}") from None
    except MemoryError:
        raise PipelineError(f"{where}: its pickle does not fit in memory") from None
    except Exception as e:  # a broken pickle stream: any of several exception types
        raise PipelineError(f"{where} holds a truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, np.ndarray) or obj.dtype != object:
        raise PipelineError(f"{where}: its pickle is a {type(obj).__name__}, expected the object array np.save "
                            "writes")
    return obj


def load_npz(path: str | Path) -> dict[str, Any]:
    """All arrays of an npz file (object arrays via the restricted unpickler). Errors name the file.

    Sizes are checked before anything is allocated (`h2ot.npyfile`: declared shapes against the bytes
    present, inflated sizes against a bound).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: no such file")
    try:
        return read_npz_file(path, _restricted_array)
    except ArrayFileError as e:
        raise PipelineError(str(e)) from None


CacheKey = tuple[str, int, int]  # (path, mtime_ns, size)
_CACHE_SIZE = 2
_CACHE: OrderedDict[CacheKey, dict[str, Any]] = OrderedDict()


def _cache_key(path: str | Path) -> CacheKey:
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: no such file")
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


def load_npz_cached(path: str | Path) -> dict[str, Any]:
    """`load_npz`, cached per process on (path, mtime, size): every sequence of a file reads it once."""
    key = _cache_key(path)
    if key not in _CACHE:
        _CACHE[key] = load_npz(path)
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return _CACHE[key]


def keep_npz_cached(paths: list[str]) -> None:
    """Drop every cached file but `paths` (a worker moving on to another input file frees the last one)."""
    wanted = {str(p) for p in paths}
    for key in [k for k in _CACHE if k[0] not in wanted]:
        del _CACHE[key]


def unwrap(value: Any) -> Any:
    """A 0-d object array (how np.savez stores a dict) -> the object; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        return value.item()
    return value
