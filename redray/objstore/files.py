"""Objects that live in files: spilled copies, and objects too large for the arena.

An object the arena cannot hold (larger than the store, or the store is full of pinned
objects) is created as a file in the store's spill directory instead, as Ray's plasma does
with its "fallback allocation": its creator maps the file and writes the value once, readers
map it read-only and deserialize it zero-copy, exactly as with a region of the arena. Where
an object lives is its *location*: an ``int`` offset into the arena, or a ``str`` file path.
A creator asking for room for an object already sealed under that id (a retried task writing
a return its dead first attempt had stored) is told ``ALREADY_STORED`` and writes nothing:
objects are immutable, as in Ray's plasma.
"""

from __future__ import annotations

import hashlib
import mmap
import os

from redray.objstore.arena import SharedArena

ALREADY_STORED = "already-stored"  # not a location: there is nothing to write
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# A new file only: never one planted in its place, nor through a symbolic link.
_NEW_FILE = os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC


def file_name(object_id: bytes) -> str:
    """The name of an object's file in the spill directory."""
    if len(object_id) <= 64:
        return object_id.hex()
    return hashlib.blake2b(object_id, digest_size=32).hexdigest()


def region(arena: SharedArena, location: int | str, size: int, writable: bool) -> memoryview:
    """A view of the `size` bytes of an object at `location` (arena offset or file path).

    A file is mapped afresh: the mapping lives as long as views into it do, so it is gone
    once the caller (and e.g. the numpy arrays deserialized from it) drop their views.
    """
    if type(location) is int:
        view = arena.view[location : location + size]
        return view if writable else view.toreadonly()
    return map_file(location, size, writable)


def map_file(path: str, size: int, writable: bool) -> memoryview:
    """Map the first `size` bytes of the file at `path` (shared, read-only unless writable)."""
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _CLOEXEC)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        os.close(fd)  # the mapping keeps what it needs
    view = memoryview(mapping)
    return view if writable else view.toreadonly()


def create_file(path: str, size: int) -> None:
    """Make a new file of `size` bytes for an object to be written through a mapping.

    Its disk blocks are reserved now, so a full disk is an OSError here rather than a
    SIGBUS in the writer when it touches a page that cannot be backed.
    """
    fd = os.open(path, os.O_RDWR | _NEW_FILE, 0o600)
    try:
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def write_file(path: str, view: memoryview) -> None:
    """Write `view` to a new file (mode 0600) straight from shared memory (no intermediate
    copy); FileExistsError if path exists."""
    fd = os.open(path, os.O_WRONLY | _NEW_FILE, 0o600)
    try:
        pos, n = 0, view.nbytes
        while pos < n:
            pos += os.write(fd, view[pos:])
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def read_file(path: str, view: memoryview) -> None:
    """Fill `view` from a file straight into shared memory."""
    with open(path, "rb", buffering=0) as f:
        pos, n = 0, view.nbytes
        while pos < n:
            got = f.readinto(view[pos:])
            if not got:
                raise OSError(f"spill file {path} is truncated ({pos} of {n} bytes)")
            pos += got


def remove_file(path: str) -> None:
    """Delete an object's file; one already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
