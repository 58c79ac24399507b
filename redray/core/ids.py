"""Identifiers. Raw bytes inside the runtime, hex strings at the API and in Redis.

A task id is the submitting worker's 8-byte prefix and a 6-byte counter; an object id is its
task id and a 2-byte index (0 for `put`, 1..n for a task's returns), so an object's id tells
which task made it. A generator task's items have ids of their own (`item_id`).
"""

from __future__ import annotations

import os
import threading

OWNER_BYTES = 8  # a task id's prefix: the process that submitted it
COUNTER_BYTES = 6
TASK_ID_BYTES = OWNER_BYTES + COUNTER_BYTES
OBJECT_ID_BYTES = 16


class IdSource:
    """Unique task and object ids for one process."""

    def __init__(self, prefix: bytes | None = None):
        self.prefix = prefix or os.urandom(OWNER_BYTES)
        self._issued = 0
        self._lock = threading.Lock()

    def task_id(self) -> bytes:
        with self._lock:
            self._issued = n = self._issued + 1
        return self.prefix + n.to_bytes(COUNTER_BYTES, "big")

    def issued(self) -> int:
        """The counter of the last id made (0: none yet); ids are made in counter order."""
        return self._issued

    def task_id_at(self, counter: int) -> bytes:
        return self.prefix + counter.to_bytes(COUNTER_BYTES, "big")

    def put_id(self) -> bytes:
        return self.task_id() + b"\x00\x00"


def return_id(task_id: bytes, index: int) -> bytes:
    """The id of a task's index-th return value (index from 0)."""
    return task_id + (index + 1).to_bytes(2, "big")


def item_id(task_id: bytes, index: int) -> bytes:
    """The id of the index-th item (from 0) a generator task yields: its task id, the
    index field 0xffff (never a return's) and a 4-byte item index."""
    return task_id + b"\xff\xff" + index.to_bytes(4, "big")


def counter_of(task_id: bytes) -> int:
    """A task id's counter (ids of one owner compare as their counters do)."""
    return int.from_bytes(task_id[OWNER_BYTES:TASK_ID_BYTES], "big")


def task_of(object_id: bytes) -> bytes:
    return object_id[:TASK_ID_BYTES]


def new_id(n: int = 16) -> bytes:
    return os.urandom(n)


class BaseID:
    """An id as Ray's API objects show it (`JobID`, `TaskID`, ...): compared by value,
    `.hex()` and `.binary()`. Returned by `RuntimeContext.get()` and its id properties."""

    __slots__ = ("_id",)

    def __init__(self, id_bytes: bytes):
        if not isinstance(id_bytes, bytes):
            raise TypeError(f"{type(self).__name__} needs bytes, got {type(id_bytes).__name__}")
        self._id = id_bytes

    @classmethod
    def from_hex(cls, hex_id: str) -> BaseID:
        return cls(bytes.fromhex(hex_id))

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def is_nil(self) -> bool:
        return all(b == 0xFF for b in self._id)  # Ray's nil ids are all 0xff

    def size(self) -> int:
        return len(self._id)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._id == self._id  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()})"

    __str__ = __repr__

    def __reduce__(self) -> tuple:
        return (type(self), (self._id,))


class JobID(BaseID):
    __slots__ = ()


class NodeID(BaseID):
    __slots__ = ()


class TaskID(BaseID):
    __slots__ = ()


class ActorID(BaseID):
    __slots__ = ()
