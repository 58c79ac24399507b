"""Process-wide state: the core worker of this process and per-thread serialization scopes.

Kept apart from `worker.py` so that `ObjectRef` and the serializer can reach the running core
worker without importing the runtime (and without import cycles).
"""

from __future__ import annotations

import threading
from typing import Any

current: Any = None  # the CoreWorker of this process once init() or a worker has started it

_scope = threading.local()


def worker() -> Any:
    """The running core worker; starts a local cluster on first use, as Ray does."""
    if current is None:
        from redray import api

        api.init()
    return current


def note_serialized_ref(ref: Any) -> None:
    """Called while a value is pickled: remember the refs it contains."""
    refs = getattr(_scope, "serialized", None)
    if refs is not None:
        refs.append(ref)


class collect_refs:
    """Within this block, refs pickled on this thread are collected into `self.refs`."""

    __slots__ = ("refs", "_outer")

    def __enter__(self) -> collect_refs:
        self._outer = getattr(_scope, "serialized", None)
        self.refs = _scope.serialized = []
        return self

    def __exit__(self, *exc: object) -> None:
        _scope.serialized = self._outer


def deserialize_scope() -> Any:
    """Where refs found while unpickling on this thread are reported (None = register now)."""
    return getattr(_scope, "deserializing", None)


class deserializing:
    """Within this block, refs unpickled on this thread are collected, not registered."""

    __slots__ = ("refs", "_outer")

    def __enter__(self) -> deserializing:
        self._outer = getattr(_scope, "deserializing", None)
        self.refs = _scope.deserializing = []
        return self

    def __exit__(self, *exc: object) -> None:
        _scope.deserializing = self._outer
