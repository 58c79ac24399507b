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
    return cloudpickle.dumps(fn, protocol=5)
