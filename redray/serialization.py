"""Turning user values into bytes and back, noting the ObjectRefs they contain.

Small values travel inline as one pickle; large ones go to the shared-memory store with their
buffers out of band (pickle protocol 5), so numpy arrays are read back zero-copy. cloudpickle
is used so that lambdas and classes defined in a driver's ``__main__`` reach the workers.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from redray import context

INLINE_LIMIT = 100 * 1024  # values up to this size travel inline, as Ray's default

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
