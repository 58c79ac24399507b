"""The raylet's object table over the shared arena: lifecycle, pinning, spilling.

Only the raylet allocates and frees. Writers get an offset from `create`, write the
laid-out value there through their own mapping of the arena, and the raylet `seal`s it.
Readers `get` an object, which pins it (it cannot be spilled or freed while pinned), map
the region and `release` it when their last view dies.

When an allocation does not fit, sealed unpinned objects are spilled to disk in
least-recently-used order until it does; a later `get` restores them. Spill files are kept
after a restore (objects are immutable), so evicting a restored object again costs no write.

Not thread-safe: the caller serializes access (the raylet's event loop does).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from redray.objstore.allocator import Allocator
from redray.objstore.arena import SharedArena

try:
    from redray.exceptions import ObjectStoreFullError
except ImportError:  # exceptions module not written yet

    class ObjectStoreFullError(MemoryError):  # type: ignore[no-redef]
        """The object store cannot make room for a new object."""


@dataclass(eq=False, slots=True)
class _Entry:
    object_id: bytes
    size: int
    owner: Hashable
    offset: int | None  # None while the object lives only on disk
    sealed: bool = False
    pins: int = 0
    deleted: bool = False  # deleted while pinned: freed at the last release
    spill_path: str | None = None


class ObjectStore:
    """Objects of one node's shared-memory arena, keyed by `bytes` object ids."""

    def __init__(
        self,
        arena: SharedArena,
        capacity: int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        """Manage the first `capacity` bytes of `arena` (all of it by default).

        `spill_dir` is created on first use if missing; without one a private temporary
        directory is used. Either way `close()` removes every file this store wrote, and
        the directory itself if this store created it.
        """
        capacity = arena.capacity if capacity is None else capacity
        if not 0 < capacity <= arena.capacity:
            raise ValueError(f"capacity {capacity} must be in (0, {arena.capacity}]")
        self.arena = arena
        self.capacity = capacity
        self._alloc = Allocator(capacity)
        self._spill_dir = spill_dir
        self._created_spill_dir = False
        self._objects: dict[bytes, _Entry] = {}
        self._zombies: dict[bytes, _Entry] = {}  # deleted while pinned
        self._lru: OrderedDict[bytes, _Entry] = OrderedDict()  # sealed, in memory, unpinned
        self._by_owner: dict[Hashable, dict[bytes, None]] = {}
        self._num_pinned = 0
        self._pinned_bytes = 0
        self._disk_bytes = 0
        self._spilled_bytes = 0
        self._spilled_objects = 0
        self._restored_objects = 0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    def create(self, object_id: bytes, size: int, owner: Hashable) -> int:
        """Reserve an unsealed region of `size` bytes for `object_id`; return its offset.

        Spills least-recently-used objects to make room; raises ObjectStoreFullError when
        even that cannot produce a large enough hole, ValueError if the id exists.
        """
        if object_id in self._objects or object_id in self._zombies:
            raise ValueError(f"object {object_id.hex()} already exists")
        offset = self._allocate(size)
        self._objects[object_id] = _Entry(object_id, size, owner, offset)
        self._by_owner.setdefault(owner, {})[object_id] = None
        return offset

    def seal(self, object_id: bytes) -> None:
        """Mark a created object complete: it becomes visible to `contains`/`get`."""
        entry = self._objects.get(object_id)
        if entry is None:
            raise KeyError(f"object {object_id.hex()} does not exist")
        if entry.sealed:
            raise ValueError(f"object {object_id.hex()} is already sealed")
        entry.sealed = True
        self._lru[object_id] = entry

    def abort(self, object_id: bytes) -> None:
        """Drop an unsealed object (its creator died or gave up). Unknown ids are ignored."""
        entry = self._objects.get(object_id)
        if entry is None:
            return
        if entry.sealed:
            raise ValueError(f"object {object_id.hex()} is sealed; use delete()")
        self.delete(object_id)

    def contains(self, object_id: bytes) -> bool:
        """True if the object is sealed and present, in memory or spilled."""
        entry = self._objects.get(object_id)
        return entry is not None and entry.sealed

    def get(self, object_id: bytes) -> tuple[int, int] | None:
        """Pin a sealed object and return ``(offset, size)``; None if unknown or unsealed.

        A spilled object is restored into memory first (which may spill others, or raise
        ObjectStoreFullError). Every successful `get` must be matched by one `release`.
        """
        entry = self._objects.get(object_id)
        if entry is None or not entry.sealed:
            return None
        if entry.offset is None:
            self._restore(entry)
        assert entry.offset is not None
        if entry.pins == 0:
            self._lru.pop(object_id, None)
            self._num_pinned += 1
            self._pinned_bytes += entry.size
        entry.pins += 1
        return entry.offset, entry.size

    def release(self, object_id: bytes) -> None:
        """Undo one `get`. The last release of a deleted object frees it.

        Releasing after `close()` is a no-op, so late view finalizers are harmless.
        """
        if self._closed:
            return
        entry = self._objects.get(object_id) or self._zombies.get(object_id)
        if entry is None or entry.pins == 0:
            raise ValueError(f"object {object_id.hex()} is not pinned")
        entry.pins -= 1
        if entry.pins:
            return
        self._num_pinned -= 1
        self._pinned_bytes -= entry.size
        if entry.deleted:
            del self._zombies[object_id]
            self._free(entry)
        else:
            self._lru[object_id] = entry  # most recently used

    def delete(self, object_id: bytes) -> None:
        """Forget the object: free its memory and spill file now, or at its last release.

        It disappears from `contains`/`get` immediately. Unknown ids are ignored.
        """
        entry = self._objects.pop(object_id, None)
        if entry is None:
            return
        owned = self._by_owner.get(entry.owner)
        if owned is not None:
            owned.pop(object_id, None)
            if not owned:
                del self._by_owner[entry.owner]
        self._lru.pop(object_id, None)
        if entry.pins:
            entry.deleted = True
            self._zombies[object_id] = entry
            self._remove_spill_file(entry)
        else:
            self._free(entry)

    def delete_owned_by(self, owner: Hashable) -> list[bytes]:
        """Delete every object of `owner` (it died); return their ids in creation order."""
        ids = list(self._by_owner.get(owner, ()))
        for object_id in ids:
            self.delete(object_id)
        return ids

    # -- raw access for the object manager ------------------------------------------

    def read_bytes(self, object_id: bytes) -> memoryview | None:
        """Pin a sealed object and return a read-only view of its bytes (None if absent).

        Call `release(object_id)` once the view is no longer used.
        """
        loc = self.get(object_id)
        if loc is None:
            return None
        offset, size = loc
        return self.arena.view[offset : offset + size].toreadonly()

    def write_buffer(self, object_id: bytes) -> memoryview:
        """Writable view of an unsealed object's region, e.g. to receive it from a peer."""
        entry = self._objects.get(object_id)
        if entry is None or entry.sealed:
            raise ValueError(f"object {object_id.hex()} is not an unsealed object")
        assert entry.offset is not None
        return self.arena.view[entry.offset : entry.offset + entry.size]

    # -- introspection ---------------------------------------------------------------

    @property
    def spill_dir(self) -> str:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="redray-spill-")
            self._created_spill_dir = True
        return self._spill_dir

    def stats(self) -> dict:
        """Counters for heartbeats and the state API.

        ``spilled_*`` and ``restored_objects`` are cumulative; ``disk_bytes`` is what the
        spill files hold now and ``num_spilled`` how many objects are only on disk.
        """
        return {
            "capacity": self.capacity,
            "used": self._alloc.used,
            "num_objects": len(self._objects),
            "num_pinned": self._num_pinned,
            "pinned_bytes": self._pinned_bytes,
            "num_unsealed": sum(1 for e in self._objects.values() if not e.sealed),
            "num_spilled": sum(1 for e in self._objects.values() if e.offset is None),
            "spilled_bytes": self._spilled_bytes,
            "spilled_objects": self._spilled_objects,
            "restored_objects": self._restored_objects,
            "disk_bytes": self._disk_bytes,
            "largest_free": self._alloc.largest_free(),
            "spill_dir": self._spill_dir,
        }

    def close(self) -> None:
        """Delete every spill file this store wrote (and the spill dir if it created it).

        The arena is not closed: it belongs to whoever created it.
        """
        if self._closed:
            return
        self._closed = True
        for entry in (*self._objects.values(), *self._zombies.values()):
            self._remove_spill_file(entry)
        self._objects.clear()
        self._zombies.clear()
        self._lru.clear()
        self._by_owner.clear()
        if self._created_spill_dir and self._spill_dir is not None:
            try:
                os.rmdir(self._spill_dir)
            except OSError:
                pass  # someone else put files there; they are not ours to delete

    # -- internals -------------------------------------------------------------------

    def _allocate(self, size: int) -> int:
        offset = self._alloc.allocate(size)
        if offset is not None:
            return offset
        # Spill only if evicting every candidate could produce a large enough hole.
        need = self._alloc.round_up(size)
        if need > self._largest_hole_after_spilling():
            raise self._full_error(size)
        while self._lru:
            _, victim = self._lru.popitem(last=False)
            self._spill(victim)
            offset = self._alloc.allocate(size)
            if offset is not None:
                return offset
        raise self._full_error(size)

    def _largest_hole_after_spilling(self) -> int:
        """Largest hole left once every spillable object is evicted."""
        spillable = {e.offset for e in self._lru.values()}
        fixed = sorted(
            (off, size) for off, size in self._alloc.allocations().items() if off not in spillable
        )
        largest, pos = 0, 0
        for off, size in fixed:
            largest = max(largest, off - pos)
            pos = off + size
        return max(largest, self._alloc.capacity - pos)

    def _full_error(self, size: int) -> ObjectStoreFullError:
        return ObjectStoreFullError(
            f"object store full: cannot allocate {size} bytes; capacity {self.capacity} bytes, "
            f"{self._pinned_bytes} bytes pinned by {self._num_pinned} objects, "
            f"{self._alloc.used} bytes in use, largest free hole {self._alloc.largest_free()} "
            "bytes (pinned and unsealed objects cannot be spilled)"
        )

    def _spill(self, entry: _Entry) -> None:
        assert entry.offset is not None
        if entry.spill_path is None:
            path = os.path.join(self.spill_dir, _spill_name(entry.object_id))
            try:
                self._ensure_spill_dir()
                _write_file(path, self.arena.view[entry.offset : entry.offset + entry.size])
            except OSError as exc:
                self._lru[entry.object_id] = entry
                self._lru.move_to_end(entry.object_id, last=False)
                raise ObjectStoreFullError(
                    f"object store full and spilling {entry.size} bytes to {path} failed: {exc}"
                ) from exc
            entry.spill_path = path
            self._disk_bytes += entry.size
        self._alloc.free(entry.offset)
        entry.offset = None
        self._spilled_bytes += entry.size
        self._spilled_objects += 1

    def _ensure_spill_dir(self) -> None:
        if not os.path.isdir(self.spill_dir):
            os.makedirs(self.spill_dir, mode=0o700)
            self._created_spill_dir = True

    def _restore(self, entry: _Entry) -> None:
        assert entry.spill_path is not None
        offset = self._allocate(entry.size)
        try:
            _read_file(entry.spill_path, self.arena.view[offset : offset + entry.size])
        except BaseException:
            self._alloc.free(offset)
            raise
        entry.offset = offset
        self._restored_objects += 1

    def _free(self, entry: _Entry) -> None:
        if entry.offset is not None:
            self._alloc.free(entry.offset)
            entry.offset = None
        self._remove_spill_file(entry)

    def _remove_spill_file(self, entry: _Entry) -> None:
        if entry.spill_path is None:
            return
        try:
            os.unlink(entry.spill_path)
        except FileNotFoundError:
            pass
        entry.spill_path = None
        self._disk_bytes -= entry.size


def _spill_name(object_id: bytes) -> str:
    if len(object_id) <= 64:
        return object_id.hex()
    return hashlib.blake2b(object_id, digest_size=32).hexdigest()


def _write_file(path: str, view: memoryview) -> None:
    """Write `view` to a new file straight from shared memory (no intermediate copy)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        pos, n = 0, view.nbytes
        while pos < n:
            pos += os.write(fd, view[pos:])
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _read_file(path: str, view: memoryview) -> None:
    """Fill `view` from a spill file straight into shared memory."""
    with open(path, "rb", buffering=0) as f:
        pos, n = 0, view.nbytes
        while pos < n:
            got = f.readinto(view[pos:])
            if not got:
                raise OSError(f"spill file {path} is truncated ({pos} of {n} bytes)")
            pos += got
