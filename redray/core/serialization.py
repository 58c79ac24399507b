"""Turning user values into bytes and back, noting the ObjectRefs they contain.

Small values travel inline as one pickle; large ones go to the shared-memory store with their
buffers out of band (pickle protocol 5), so numpy arrays are read back zero-copy. cloudpickle
is used so that lambdas and classes defined in a driver's ``__main__`` reach the workers.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

import cloudpickle

from redray import exceptions
from redray.core import context

INLINE_LIMIT = 100 * 1024  # values up to this size travel inline, as Ray's default
FUNCTION_SIZE_WARN_THRESHOLD = 10_000_000  # pickled functions and classes, as Ray's
FUNCTION_SIZE_ERROR_THRESHOLD = 100_000_000
_MIB = 1024 * 1024

_PRIMITIVES = frozenset({bytes, str, int, float, bool, type(None)})


class SerializationError(TypeError):
    """A value could not be pickled; raised at the call site that tried to send it."""


def dumps(value: Any) -> tuple[bytes, list]:
    """Pickle a value; returns (bytes, refs it contains)."""
    if type(value) in _PRIMITIVES:
        return pickle.dumps(value, protocol=5), []
    with context.collect_refs() as found:
        data = cloudpickle.dumps(value, protocol=5)
    return data, found.refs


def dumps_oob(value: Any) -> tuple[bytes, list[pickle.PickleBuffer], list]:
    """Pickle with out-of-band buffers: (in-band bytes, buffers, refs it contains)."""
    if type(value) in _PRIMITIVES:
        return pickle.dumps(value, protocol=5), [], []
    buffers: list[pickle.PickleBuffer] = []
    with context.collect_refs() as found:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return data, buffers, found.refs


def oob_size(inband: bytes, buffers: list[pickle.PickleBuffer]) -> int:
    return len(inband) + sum(memoryview(b).nbytes for b in buffers)


def loads(data: bytes | memoryview, buffers=None) -> Any:
    return pickle.loads(data, buffers=buffers)


def describe_failure(value: Any, exc: BaseException, what: str) -> SerializationError:
    """A TypeError that names the value that could not be sent and why."""
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return SerializationError(
        f"Could not serialize {what} {shown}: {type(exc).__name__}: {exc}. "
        "Arguments and return values must be picklable (by cloudpickle)."
    )


def dumps_function(fn: Any) -> bytes:
    """Pickle a function or class by value, remembering the file it was defined in."""
    code = getattr(fn, "__code__", None)
    filename = code.co_filename if code is not None else _class_file(fn)
    return pickle.dumps((filename, cloudpickle.dumps(fn, protocol=5)), protocol=5)


def check_function_size(blob: bytes, name: str, kind: str) -> None:
    """Refuse (ValueError) a pickled function or class too large to ship to every worker, and
    warn about a large one, with Ray's thresholds and messages; kind: "remote function",
    "actor"."""
    size = len(blob)
    if size <= FUNCTION_SIZE_WARN_THRESHOLD:
        return
    advice = (
        "Check that its definition is not implicitly capturing a large array or other object "
        "in scope. Tip: use redray.put() to put large objects in the object store."
    )
    if size < FUNCTION_SIZE_ERROR_THRESHOLD:
        print(
            f"Warning: The {kind} {name} is very large ({size // _MIB} MiB). {advice}",
            file=sys.stderr,
            flush=True,
        )
        return
    raise ValueError(
        f"The {kind} {name} is too large ({size // _MIB} MiB > FUNCTION_SIZE_ERROR_THRESHOLD="
        f"{FUNCTION_SIZE_ERROR_THRESHOLD // _MIB} MiB). {advice}"
    )


def loads_function(blob: bytes) -> Any:
    """The function or class back, with tracebacks pointing at its real source file.

    cloudpickle replaces the file name of code it pickles by value with "<dynamic-code>";
    putting the original back makes remote tracebacks show file, line and source.
    """
    filename, data = pickle.loads(blob)
    fn = cloudpickle.loads(data)
    if filename:
        if hasattr(fn, "__code__"):
            fn.__code__ = _with_filename(fn.__code__, filename)
        elif isinstance(fn, type):
            for value in vars(fn).values():
                target = getattr(value, "__func__", value)
                if hasattr(target, "__code__"):
                    target.__code__ = _with_filename(target.__code__, filename)
    return fn


def _class_file(cls: Any) -> str | None:
    import inspect

    try:
        return inspect.getsourcefile(cls) if isinstance(cls, type) else None
    except (TypeError, OSError):
        return None


def _with_filename(code: Any, filename: str) -> Any:
    if code.co_filename != "<dynamic-code>":
        return code
    consts = tuple(
        _with_filename(c, filename) if hasattr(c, "co_filename") else c for c in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def pickle_error(exc: BaseException) -> bytes:
    """An exception as sent in an error payload (a RaySystemError naming it if it cannot be
    pickled)."""
    try:
        return cloudpickle.dumps(exc)
    except Exception:
        return cloudpickle.dumps(exceptions.RaySystemError(repr(exc)))


def unpickle_error(data: bytes) -> BaseException:
    """The exception an error payload carries, as the caller should see it raised."""
    try:
        err = loads(data)
    except Exception as exc:
        return exceptions.RaySystemError(f"could not deserialize the task's error: {exc}")
    if isinstance(err, exceptions.RayTaskError):
        return err.as_instanceof_cause()
    return err


def error_payload(exc: BaseException) -> tuple:
    """The payload of an object whose task failed with exc."""
    return ("e", pickle_error(exc))
