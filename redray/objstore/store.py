"""The raylet's object table over the shared arena: lifecycle, pinning, spilling.

Only the raylet allocates and frees. Writers get a location from `create`, write the
laid-out value there through their own mapping, and the raylet `seal`s it. Readers `get` an
object, which pins it (it cannot be spilled, moved or freed while pinned), map its location
and `release` it when their last view dies. A location is an offset into the arena, or the
path of a file (see `files`).

When an allocation does not fit, sealed unpinned objects are spilled to disk in
least-recently-used order until it does; a later `get` restores them. Spill files are kept
after a restore (objects are immutable), so evicting a restored object again costs no write.
An object that cannot be given room even so (larger than the store, or the store is full of
pinned objects) is created in a file of its own and read from there ("fallback allocation",
as Ray's plasma does); so is a spilled object that cannot be restored for lack of room.

A region is never freed while its writer may still be copying into it: deleting an unsealed
object (its owner died, or freed it, while it was being written or pulled) only hides it;
its memory is freed when the writer seals or aborts it.

Threading: an ObjectStore has one owning thread and is not thread-safe. In the raylet the
owner is the reactor (I/O) thread; other threads (object transfers, heartbeats) hand it
work through ``reactor.call_soon``. `stats()` is O(1), so the owner can report it often.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from redray.exceptions import ObjectStoreFullError
from redray.objstore import files
from redray.objstore.allocator import Allocator
from redray.objstore.arena import SharedArena

Location = int | str  # an arena offset, or the path of the file holding the object


@dataclass(eq=False, slots=True)
class _Entry:
    object_id: bytes
    size: int
    owner: Hashable
    offset: int | None  # None while the object lives only on disk
    sealed: bool = False
    pins: int = 0
    deleted: bool = False  # deleted while pinned or unsealed: freed at last release/seal/abort
    spill_path: str | None = None
    fallback: bool = False  # created on disk (no room in the arena): its file is its home


class ObjectStore:
    """Objects of one node's shared-memory arena, keyed by `bytes` object ids."""

    def __init__(
        self,
        arena: SharedArena,
        capacity: int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        """Manage the first `capacity` bytes of `arena` (all of it by default).

        `spill_dir` (spill files and objects created on disk) is created on first use if
        missing; without one a private temporary directory is used. Either way `close()`
        removes every file this store wrote, and the directory itself if this store made it.
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
        # Deleted but still in use: pinned by readers, or unsealed (a writer copies into it).
        self._zombies: dict[bytes, _Entry] = {}
        self._lru: OrderedDict[bytes, _Entry] = OrderedDict()  # sealed, in memory, unpinned
        self._by_owner: dict[Hashable, dict[bytes, None]] = {}
        self._num_pinned = 0
        self._pinned_bytes = 0
        self._num_unsealed = 0  # of the live objects
        self._num_on_disk = 0  # live objects that exist only on disk
        self._disk_bytes = 0
        self._spilled_bytes = 0
        self._spilled_objects = 0
        self._restored_objects = 0
        self._fallback_objects = 0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    def create(self, object_id: bytes, size: int, owner: Hashable) -> Location:
        """Reserve an unsealed region of `size` bytes for `object_id`; return its location.

        Spills least-recently-used objects to make room; when even that cannot, the object
        is created in a file on disk (the location is then its path). Raises
        ObjectStoreFullError only when that fails too, ValueError if the id exists.
        """
        if object_id in self._objects or object_id in self._zombies:
            raise ValueError(f"object {object_id.hex()} already exists")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        entry = _Entry(object_id, size, owner, None)
        try:
            entry.offset = self._allocate(size)
        except ObjectStoreFullError as full:
            self._create_on_disk(entry, full)
        self._objects[object_id] = entry
        self._by_owner.setdefault(owner, {})[object_id] = None
        self._num_unsealed += 1
        if entry.offset is None:
            self._num_on_disk += 1
            return entry.spill_path  # type: ignore[return-value]
        return entry.offset

    def seal(self, object_id: bytes) -> bool:
        """Mark a created object complete: it becomes visible to `contains`/`get`.

        Returns False if the object was deleted while it was being written: its region is
        freed now, and it never becomes visible.
        """
        entry = self._objects.get(object_id)
        if entry is None:
            zombie = self._zombies.get(object_id)
            if zombie is not None and not zombie.sealed:
                del self._zombies[object_id]
                self._free(zombie)
                return False
            raise KeyError(f"object {object_id.hex()} does not exist")
        if entry.sealed:
            raise ValueError(f"object {object_id.hex()} is already sealed")
        entry.sealed = True
        self._num_unsealed -= 1
        if entry.offset is not None:
            self._lru[object_id] = entry
        return True

    def abort(self, object_id: bytes) -> None:
        """Drop an unsealed object (its creator died or gave up) and free its region.

        Unknown ids are ignored, and so is an object deleted and freed already.
        """
        entry = self._objects.get(object_id)
        if entry is None:
            zombie = self._zombies.get(object_id)
            if zombie is not None and not zombie.sealed:
                del self._zombies[object_id]
                self._free(zombie)
            return
        if entry.sealed:
            raise ValueError(f"object {object_id.hex()} is sealed; use delete()")
        self._forget(entry)
        self._free(entry)

    def being_written(self, object_id: bytes) -> bool:
        """True while the object is created and not sealed (nor deleted) yet."""
        entry = self._objects.get(object_id)
        return entry is not None and not entry.sealed

    def contains(self, object_id: bytes) -> bool:
        """True if the object is sealed and present, in memory or on disk."""
        entry = self._objects.get(object_id)
        return entry is not None and entry.sealed

    def get(self, object_id: bytes) -> tuple[Location, int] | None:
        """Pin a sealed object and return ``(location, size)``; None if unknown or unsealed.

        A spilled object is restored into memory first when it is not pinned already and
        room can be made (which may spill others); otherwise it is read from its file.
        Every successful `get` must be matched by one `release`.
        """
        entry = self._objects.get(object_id)
        if entry is None or not entry.sealed:
            return None
        if entry.pins == 0:
            if entry.offset is None and not entry.fallback:
                self._try_restore(entry)
            if entry.offset is not None:
                self._lru.pop(object_id, None)
            self._num_pinned += 1
            self._pinned_bytes += entry.size
        entry.pins += 1
        if entry.offset is not None:
            return entry.offset, entry.size
        return entry.spill_path, entry.size  # type: ignore[return-value]

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
        elif entry.offset is not None:
            self._lru[object_id] = entry  # most recently used

    def delete(self, object_id: bytes) -> None:
        """Forget the object; free its memory and files now, or once nothing uses them.

        It disappears from `contains`/`get` immediately. A pinned object is freed at its
        last release; an unsealed one when its writer seals or aborts it, so a writer still
        copying never writes into memory given to another object. Unknown ids are ignored.
        """
        entry = self._objects.get(object_id)
        if entry is None:
            return
        self._forget(entry)
        if entry.pins or not entry.sealed:
            entry.deleted = True
            self._zombies[object_id] = entry
            if entry.sealed and entry.offset is not None:
                self._remove_spill_file(entry)  # readers map the memory, not the file
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
        location, size = loc
        return files.region(self.arena, location, size, writable=False)

    def write_buffer(self, object_id: bytes) -> memoryview:
        """Writable view of an unsealed object's bytes, e.g. to receive it from a peer."""
        entry = self._objects.get(object_id)
        if entry is None or entry.sealed:
            raise ValueError(f"object {object_id.hex()} is not an unsealed object")
        location = entry.offset if entry.offset is not None else entry.spill_path
        assert location is not None
        return files.region(self.arena, location, entry.size, writable=True)

    # -- introspection ---------------------------------------------------------------

    @property
    def spill_dir(self) -> str:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="redray-spill-")
            self._created_spill_dir = True
        return self._spill_dir

    def stats(self) -> dict:
        """Counters for heartbeats and the state API, in O(1).

        ``spilled_*``, ``restored_objects`` and ``fallback_objects`` (objects created on
        disk) are cumulative; ``disk_bytes`` is what the store's files hold now and
        ``num_spilled`` how many objects are only on disk.
        """
        return {
            "capacity": self.capacity,
            "used": self._alloc.used,
            "num_objects": len(self._objects),
            "num_pinned": self._num_pinned,
            "pinned_bytes": self._pinned_bytes,
            "num_unsealed": self._num_unsealed,
            "num_spilled": self._num_on_disk,
            "num_deleted_in_use": len(self._zombies),
            "spilled_bytes": self._spilled_bytes,
            "spilled_objects": self._spilled_objects,
            "restored_objects": self._restored_objects,
            "fallback_objects": self._fallback_objects,
            "disk_bytes": self._disk_bytes,
            "largest_free": self._alloc.largest_free(),
            "spill_dir": self._spill_dir,
        }

    def close(self) -> None:
        """Delete every file this store wrote (and the spill dir if it created it).

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

    def _forget(self, entry: _Entry) -> None:
        """Take a live entry out of the tables (its memory and files are not touched)."""
        object_id = entry.object_id
        del self._objects[object_id]
        owned = self._by_owner.get(entry.owner)
        if owned is not None:
            owned.pop(object_id, None)
            if not owned:
                del self._by_owner[entry.owner]
        self._lru.pop(object_id, None)
        if not entry.sealed:
            self._num_unsealed -= 1
        if entry.offset is None:
            self._num_on_disk -= 1

    def _allocate(self, size: int) -> int:
        offset = self._alloc.allocate(size)
        if offset is not None:
            return offset
        # Spill only if evicting every candidate could produce a large enough hole.
        need = self._alloc.round_up(size)
        if need > self._alloc.capacity or need > self._largest_hole_after_spilling():
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

    def _create_on_disk(self, entry: _Entry, full: ObjectStoreFullError) -> None:
        """Give an object the arena has no room for a file of its own in the spill dir."""
        path = os.path.join(self.spill_dir, files.file_name(entry.object_id))
        try:
            self._ensure_spill_dir()
            files.create_file(path, entry.size)
        except OSError as exc:
            raise ObjectStoreFullError(
                f"{full}; creating it on disk at {path} failed too: {exc}"
            ) from exc
        entry.spill_path = path
        entry.fallback = True
        self._disk_bytes += entry.size
        self._fallback_objects += 1

    def _spill(self, entry: _Entry) -> None:
        assert entry.offset is not None
        if entry.spill_path is None:
            path = os.path.join(self.spill_dir, files.file_name(entry.object_id))
            try:
                self._ensure_spill_dir()
                files.write_file(path, self.arena.view[entry.offset : entry.offset + entry.size])
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
        self._num_on_disk += 1
        self._spilled_bytes += entry.size
        self._spilled_objects += 1

    def _ensure_spill_dir(self) -> None:
        """Make the spill dir (mode 0700) if missing; one already there must be a directory
        of ours, not a symbolic link (objects' bytes are written into it)."""
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.spill_dir)), exist_ok=True)
            os.mkdir(self.spill_dir, 0o700)
            self._created_spill_dir = True
        except FileExistsError:
            info = os.lstat(self.spill_dir)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise PermissionError(
                    f"the spill directory {self.spill_dir} is not a directory of this user"
                ) from None

    def _try_restore(self, entry: _Entry) -> None:
        """Bring a spilled object back into memory if room can be made; else leave it."""
        assert entry.spill_path is not None
        try:
            offset = self._allocate(entry.size)
        except ObjectStoreFullError:
            return  # read from its file instead
        try:
            files.read_file(entry.spill_path, self.arena.view[offset : offset + entry.size])
        except BaseException:
            self._alloc.free(offset)
            raise
        entry.offset = offset
        self._num_on_disk -= 1
        self._restored_objects += 1

    def _free(self, entry: _Entry) -> None:
        if entry.offset is not None:
            self._alloc.free(entry.offset)
            entry.offset = None
        self._remove_spill_file(entry)

    def _remove_spill_file(self, entry: _Entry) -> None:
        if entry.spill_path is None:
            return
        files.remove_file(entry.spill_path)
        entry.spill_path = None
        self._disk_bytes -= entry.size
