"""The node's shared-memory arena: one big file mapped once into every process on the node.

On Linux the arena is an anonymous ``memfd_create`` file. It has no name in any file
system, so nothing can be left behind in /dev/shm even when the raylet is SIGKILLed: the
memory goes away with the last process that maps it or holds its fd. Other processes on the
node attach by opening ``/proc/<raylet_pid>/fd/<fd>`` (same user), or by inheriting the fd.
Where memfd is unavailable, a named file under /dev/shm (or the temp dir) is used instead and
unlinked by the creator's ``close()``.

The file is ``ftruncate``d to the capacity, so it is sparse: pages only cost memory once
they are touched.
"""

from __future__ import annotations

import mmap
import os
import secrets
import sys
import tempfile

MEMFD_NAME = "redray-store"
_FALLBACK_PREFIX = "redray-store-"
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def _fallback_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class SharedArena:
    """A writable shared mapping of `capacity` bytes. `view` covers the whole mapping."""

    fd: int
    capacity: int
    path: str | None
    view: memoryview

    def __init__(
        self,
        fd: int,
        capacity: int,
        path: str | None,
        origin: tuple[int, int] | None,
        owns_path: bool,
    ) -> None:
        """Map `fd`; use the `create`/`attach*` constructors rather than this directly."""
        size = os.fstat(fd).st_size
        if size < capacity:
            os.close(fd)
            raise ValueError(f"shared arena is {size} bytes, expected at least {capacity}")
        self.fd = fd
        self.capacity = capacity
        self.path = path
        self._origin = origin  # (pid, fd) another process can open via /proc
        self._owns_path = owns_path
        self._closed = False
        try:
            self._mmap = mmap.mmap(
                fd, capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(fd)
            raise
        self.view = memoryview(self._mmap)

    @classmethod
    def create(cls, capacity: int, memfd: bool | None = None) -> SharedArena:
        """Create a new arena (raylet side).

        `memfd=None` uses memfd_create when the platform has it and the named-file fallback
        otherwise; True/False force one mode (False is how tests exercise the fallback).
        """
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        use_memfd = hasattr(os, "memfd_create") if memfd is None else memfd
        if use_memfd:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, capacity)
            except BaseException:
                os.close(fd)
                raise
            return cls(fd, capacity, None, (os.getpid(), fd), owns_path=False)

        path = os.path.join(
            _fallback_dir(), f"{_FALLBACK_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        )
        flags = os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, os.O_RDWR | flags, 0o600)
        try:
            os.ftruncate(fd, capacity)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        try:
            return cls(fd, capacity, path, None, owns_path=True)  # closes fd if it fails
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, pid: int, fd: int, capacity: int) -> SharedArena:
        """Map the memfd arena that process `pid` holds open as `fd`.

        Passing our own pid attaches through an fd this process already holds (e.g. one
        inherited from the raylet via ``pass_fds``); it is dup'ed, so the caller keeps its own.
        """
        if pid == os.getpid():
            own = os.dup(fd)
        else:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        return cls(own, capacity, None, (pid, fd), owns_path=False)

    @classmethod
    def attach_path(cls, path: str, capacity: int) -> SharedArena:
        """Map a fallback (named file) arena created by another process."""
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        return cls(fd, capacity, path, None, owns_path=False)

    def descriptor(self) -> tuple:
        """What another process on this node needs to attach (picklable, small)."""
        if self.path is not None:
            return ("path", self.path, self.capacity)
        pid, fd = self._origin if self._origin is not None else (os.getpid(), self.fd)
        return ("memfd", pid, fd, self.capacity)

    @classmethod
    def from_descriptor(cls, d: tuple) -> SharedArena:
        """Attach to the arena described by a `descriptor()` tuple."""
        kind = d[0]
        if kind == "memfd":
            _, pid, fd, capacity = d
            return cls.attach(pid, fd, capacity)
        if kind == "path":
            _, path, capacity = d
            return cls.attach_path(path, capacity)
        raise ValueError(f"unknown arena descriptor {d!r}")

    def prefault(self, offset: int, length: int) -> bool:
        """Fault in the pages of a region this process is about to write (best effort).

        Populating a cold range up front is about twice as fast as taking one page fault
        per 4 KiB while copying, but costs a page-table walk on warm memory, so call it for
        large writes into memory this process has not touched yet. Returns False where the
        kernel (Linux >= 5.14) does not support it.
        """
        if not sys.platform.startswith("linux"):
            return False
        page = mmap.PAGESIZE
        start = offset - offset % page
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE, start, offset + length - start)
        except (OSError, ValueError, AttributeError):
            return False
        return True

    def close(self) -> None:
        """Unmap and close the fd; unlink the fallback file if this process created it.

        If views handed out from `view` (e.g. zero-copy numpy arrays) are still alive the
        mapping itself stays valid until they die; it is released by garbage collection.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_path and self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            pass  # exported views still alive; the mapping is freed with the last of them
        os.close(self.fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SharedArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else f"memfd:{MEMFD_NAME}"
        return f"SharedArena({where}, capacity={self.capacity})"
