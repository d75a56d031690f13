"""What crosses from a Dask worker to the daemon: plain data the daemon parses and checks, never code it runs.

A worker host is less trusted than the service VM (it fetches whatever URLs clients send, from anywhere).
Dask moves Python objects as pickles, and unpickling runs whatever the pickle names, so a compromised worker
could run code in the daemon, next to the spool. So:

- a task's result is JSON, as bytes (``encode_result`` on the worker, ``parse_result`` in the daemon): the
  worker's address and one row per image, or why the task could not run. The daemon checks every field
  (types, the task's image indices in order, perimeter = 2 * (width + height), a known error kind)
  before it records anything; anything else is a task that failed on that worker;
- the daemon's client asks for results serialised as msgpack only (``RESULT_DESERIALIZERS``), so a result
  that is not plain data is refused, not unpickled;
- what Dask still unpickles in the daemon (the exception of a failed task, the type of a result) goes
  through ``plain_loads``, which builds exception objects and plain values and refuses every other class or
  function a pickle names (``refuse_code_from_the_cluster`` installs it in the daemon's process).
"""
from __future__ import annotations

import io
import json
import math
import pickle
import sys
from enum import Enum

from daemon.engine.outcome import ErrorKind, ImageOutcome, TaskImages
from daemon.runners import Loss, TaskDone, TaskLost

#: What the daemon's Dask client accepts as the serialisation of a result: msgpack, which carries only
#: plain values. Results serialised with pickle (or Dask's own family, which pickles the type) are refused.
RESULT_DESERIALIZERS = ("msgpack",)
_KINDS = {kind.value for kind in ErrorKind}


# ------------------------------------------------------------------------ results
def encode_result(worker: str, outcomes: list[ImageOutcome] | None = None, lost: str | None = None,
                  cause: Loss = Loss.DIED) -> bytes:
    """On the worker: the task's outcomes, or why it was lost (``cause`` says what the daemon makes of it)."""
    if outcomes is None:
        return json.dumps({"worker": worker, "lost": lost, "cause": cause.value}).encode()
    rows = [[o.index, o.width, o.height, o.perimeter, o.error, o.kind and o.kind.value, round(o.seconds, 6), o.bytes]
            for o in outcomes]
    return json.dumps({"worker": worker, "done": rows}, separators=(",", ":")).encode()


class InvalidResult(ValueError):
    """A worker's answer that is not what encode_result makes."""


def parse_result(task_id: int, data: object, images: TaskImages) -> tuple[TaskDone | TaskLost, str]:
    """In the daemon: a worker's answer, checked field by field, and the worker it names. Raises InvalidResult."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > 64 * 1024 * (len(images) + 1):
        raise InvalidResult(f"not JSON bytes of a sane size: {type(data).__name__}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidResult(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("worker"), str):
        raise InvalidResult("not an object naming its worker")
    worker = doc["worker"][:200]
    if "lost" in doc:
        if not isinstance(doc["lost"], str) or doc.get("cause") not in {cause.value for cause in Loss}:
            raise InvalidResult("a loss without its reason or cause")
        return TaskLost(task_id, doc["lost"][:2000], Loss(doc["cause"]), where=worker), worker
    rows = doc.get("done")
    if not isinstance(rows, list) or len(rows) != len(images):
        raise InvalidResult(f"{len(rows) if isinstance(rows, list) else 'no'} outcomes for {len(images)} images")
    return TaskDone(task_id, [_outcome(row, index) for row, (index, _url) in zip(rows, images)]), worker


def _outcome(row: object, index: int) -> ImageOutcome:
    if not isinstance(row, list) or len(row) != 8:
        raise InvalidResult(f"image {index}: not a row of 8 fields")
    got, width, height, perimeter, error, kind, seconds, nbytes = row
    if got != index:
        raise InvalidResult(f"image {index}: the row is for image {got!r}")
    if not (_count(seconds, float) and _count(nbytes, int)):
        raise InvalidResult(f"image {index}: seconds or bytes not a count")
    if error is None:
        if not (_count(width, int) and _count(height, int) and perimeter == 2 * (width + height)) or kind is not None:
            raise InvalidResult(f"image {index}: width {width!r}, height {height!r}, perimeter {perimeter!r}")
        return ImageOutcome(index, width, height, perimeter, None, None, float(seconds), nbytes)
    if not isinstance(error, str) or kind not in _KINDS or (width, height, perimeter) != (None, None, None):
        raise InvalidResult(f"image {index}: an error without its kind, or with a size")
    return ImageOutcome(index, None, None, None, error[:2000], ErrorKind(kind), float(seconds), nbytes)


def _count(value: object, kind: type) -> bool:
    """A non-negative int (or, for floats, any finite non-negative number); never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        return False
    return value >= 0 and (kind is int or math.isfinite(value))


# ------------------------------------------------------------------------ the rest of what Dask unpickles
class NotPlainData(pickle.UnpicklingError, TypeError):
    """A pickle from the cluster named something other than an exception or a plain value. A TypeError too,
    because that is what Dask's own code expects (and shrugs off) when it cannot rebuild a traceback."""


class _Ignored:
    """Stands in for what only decorates an exception (its traceback's frames): built, never used."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class WorkerSeen:
    """Stands in for the scheduler's record of a worker (in KilledWorker): only its address is kept."""

    address = "an unknown worker"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict) and isinstance(part.get("address"), str):
                self.address = part["address"]


def _no_traceback(*args):
    return None


def _exception(func, args, cause=None, tb=None, context=None, suppress_context=False, notes=None):
    """tblib's unpickle_exception, without the traceback, and only for exception classes."""
    if not (isinstance(func, type) and issubclass(func, BaseException)):
        raise NotPlainData(f"not an exception class: {func!r}")
    exc = func(*args)
    exc.__cause__ = cause if isinstance(cause, BaseException) else None
    return exc


def _exception_with_attrs(func, attrs, cause, tb, context, suppress_context, notes, args=()):
    exc = _exception(func, args, cause)
    for key, value in (attrs or {}).items():
        if isinstance(key, str) and not key.startswith("__"):
            setattr(exc, key, value)
    return exc


_STANDINS = {
    ("tblib.pickling_support", "unpickle_exception"): _exception,
    ("tblib.pickling_support", "unpickle_exception_with_attrs"): _exception_with_attrs,
    ("tblib.pickling_support", "unpickle_traceback"): _no_traceback,
    ("tblib", "Frame"): _Ignored, ("tblib", "Code"): _Ignored, ("tblib", "Traceback"): _Ignored,
    ("distributed.scheduler", "WorkerState"): WorkerSeen,
}
_PLAIN = {("builtins", name) for name in ("bytes", "bytearray", "str", "int", "float", "complex", "bool", "tuple",
                                          "list", "dict", "set", "frozenset", "object", "NoneType")} | \
         {("collections", name) for name in ("deque", "defaultdict", "OrderedDict")}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _STANDINS:
            return _STANDINS[(module, name)]
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        found = getattr(sys.modules.get(module), name, None) if "." not in name else None  # never imports
        if isinstance(found, type) and issubclass(found, (BaseException, Enum)):
            return found  # building an exception or looking up an enum's member runs nothing else
        if module == "copyreg" and name in ("_reconstructor", "__newobj__", "__newobj_ex__"):
            return super().find_class(module, name)  # they only call the classes above
        raise NotPlainData(f"refused to unpickle {module}.{name} from the Dask cluster")


def plain_loads(data, *, buffers=()):
    """``pickle.loads`` for what comes from the cluster: exceptions and plain values, nothing else."""
    return _PlainUnpickler(io.BytesIO(data), buffers=buffers).load()


def refuse_code_from_the_cluster() -> None:
    """Make this process's Dask client unpickle through ``plain_loads``. Dask calls ``loads`` through these
    two names (checked by tests/test_scale_out.py with a worker that sends a pickle that would run code)."""
    import distributed.client
    import distributed.protocol.pickle

    distributed.protocol.pickle.loads = plain_loads
    distributed.client.loads = plain_loads
