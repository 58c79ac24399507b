"""Process-wide state: the core worker of this process and per-thread serialization scopes.

The bottom of the core: `ObjectRef`, actor handles and the serializer reach the running core
worker through `current` without importing the runtime.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions

current: Any = None  # the CoreWorker of this process once init() or a worker has started it
# How to start a cluster on first use, as Ray does (redray.api sets it to `init`).
start_cluster: Callable[[], Any] | None = None

PAUSE_GC_REFS = 1000  # values with this many refs are rebuilt with the cyclic GC paused

scopes = threading.local()  # per-thread serialization scopes (see below)


def worker() -> Any:
    """The running core worker; starts a local cluster on first use, as Ray does.

    Raises LocalRayletDiedError once the raylet of this process's node has died: nothing
    can be run, stored or fetched any more."""
    running = current
    if running is None:
        if start_cluster is None:
            raise exceptions.RaySystemError("redray is not initialized: call redray.init()")
        start_cluster()
        return current
    if running.raylet_lost:
        raise exceptions.LocalRayletDiedError(
            "The raylet of this node died, so this driver can no longer run tasks or reach "
            "objects. Call redray.shutdown() (and redray.init() to start again)."
        )
    return running


def note_serialized_ref(ref: Any) -> None:
    """Called while a value is pickled: remember the refs it contains."""
    refs = getattr(scopes, "serialized", None)
    if refs is not None:
        refs.append(ref)


class collect_refs:
    """Within this block, refs pickled on this thread are collected into `self.refs`."""

    __slots__ = ("refs", "_outer")

    def __enter__(self) -> collect_refs:
        self._outer = getattr(scopes, "serialized", None)
        self.refs = scopes.serialized = []
        return self

    def __exit__(self, *exc: object) -> None:
        scopes.serialized = self._outer


def count_unpickled(ref: Any) -> None:
    """A ref was unpickled outside any `deserializing` block: count and register it now."""
    worker = current
    if worker is not None:
        worker.register_borrows(worker.count_deserialized([ref]))


def deserialize_scope() -> list | None:
    """Where refs unpickled on this thread are collected (None: outside `deserializing`)."""
    return getattr(scopes, "deserializing", None)


class deserializing:
    """Within this block, refs unpickled on this thread are collected and counted in one batch.

    Unpickling a value that holds many refs would otherwise take the worker's lock once per
    ref. Inside the block each rebuilt ref (an `ObjectRef` or actor handle: anything with
    `_id` and `_owner`) is only appended to a list, which also keeps it alive; on leaving the
    block (even on error, so counts match the refs that exist) they are all counted at once.
    `refs` is then the ids of the objects newly borrowed from other owners; the caller
    registers them with `register_borrows` (now, or for a task's arguments, with its reply).
    """

    __slots__ = ("refs", "_outer", "_pause_gc", "_gc_was_on")

    def __init__(self, expected_refs: int = 0):
        # Rebuilding thousands of refs would run the cyclic GC every 700 new objects, and
        # each run (older generations too) costs more than the whole batch it interrupts:
        # the collector waits until the value is built. A GC turned off by the program
        # stays off.
        self._pause_gc = expected_refs >= PAUSE_GC_REFS

    def __enter__(self) -> deserializing:
        self._outer = getattr(scopes, "deserializing", None)
        self.refs = scopes.deserializing = []
        if self._pause_gc:
            self._gc_was_on = gc.isenabled()
            gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pause_gc and self._gc_was_on:
            gc.enable()
        scopes.deserializing = self._outer
        found, self.refs = self.refs, []
        if found and current is not None:
            self.refs = current.count_deserialized(found)
