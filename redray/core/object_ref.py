"""`ObjectRef`: a handle to a value that exists (or will exist) somewhere in the cluster.

A ref names its object and its owner (the process that created it). Every live `ObjectRef`
instance counts as a reference in its process; when the last one goes away the process tells
the owner, which frees the object once no process refers to it any more.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any

from redray.core import context

if TYPE_CHECKING:
    import asyncio

Address = tuple[str, int, bytes]  # (host, port, worker_id) of a core worker's listener


class ObjectRef:
    """A reference to an object in the cluster, as returned by `.remote()` and `put()`."""

    __slots__ = ("_id", "_owner", "__weakref__")

    def __init__(self, object_id: bytes, owner: Address | None, _register: bool = True):
        self._id = object_id
        self._owner = owner
        if _register:
            context.worker().add_local_ref(object_id, owner)

    def __del__(self) -> None:
        worker = context.current
        if worker is not None:
            try:
                worker.remove_local_ref(self._id)
            except Exception:  # interpreter shutdown
                pass

    def __reduce__(self):
        context.note_serialized_ref(self)
        return (_rebuild_ref, (self._id, self._owner))

    def __copy__(self) -> ObjectRef:
        return self

    def __deepcopy__(self, memo: dict) -> ObjectRef:
        return self

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def task_id(self) -> bytes:
        return self._id[:-2]

    def owner_address(self) -> Address | None:
        return self._owner

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def future(self) -> concurrent.futures.Future:
        """A concurrent.futures.Future resolved with this object's value (or error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        worker = context.worker()
        # Settled by whichever thread learns the object is ready, often the one running the
        # reactor loop: settle_future never blocks it.
        objects = worker.objects
        objects.on_ready(self, lambda: objects.settle_future(future, self))
        worker.reactor.ensure_running()
        return future

    def __await__(self):
        import asyncio  # (only here: a raylet or a plain script never pays for asyncio)

        return asyncio.wrap_future(self.future()).__await__()

    def as_future(self) -> asyncio.Future:
        import asyncio

        return asyncio.wrap_future(self.future())


_new_ref = object.__new__
_scopes = context.scopes


def _rebuild_ref(object_id: bytes, owner: Address | None) -> ObjectRef:
    """Unpickle a ref: it counts from now on (see `context.deserializing` for the batch).

    Runs once per ref in a value, so it avoids `__init__` and any lock: inside a
    `deserializing` block the ref is only collected; alone it is counted at once.
    """
    ref = _new_ref(ObjectRef)
    ref._id = object_id
    ref._owner = owner
    scope = getattr(_scopes, "deserializing", None)
    if scope is not None:
        scope.append(ref)
    else:
        context.count_unpickled(ref)
    return ref


ObjectID = ObjectRef


def is_object_ref(value: Any) -> bool:
    return type(value) is ObjectRef
