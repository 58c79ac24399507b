"""How a value is laid out in its object-store region, and how it is read back zero-copy.

Values are pickled with protocol 5; large contiguous buffers (numpy arrays, PickleBuffer)
go out-of-band and are copied once, straight into shared memory. A region looks like::

    header   magic "RRY5" | u32 number of buffers | u64 in-band length      (16 bytes)
    table    per buffer: u64 offset from region start | u64 length           (16 bytes each)
    in-band  the pickle stream
    buffers  each starting at a 64-byte aligned offset

Regions start 64-byte aligned (the allocator guarantees it), so buffers are aligned in
absolute terms too, which numpy and SIMD code like.

Reading hands every out-of-band buffer back as a read-only slice of one read-only numpy
array covering the region; a ``weakref.finalize`` on that array tells the caller when the
last view into the region has died, so the raylet can unpin the object.
"""

from __future__ import annotations

import pickle
import struct
import weakref
from collections.abc import Callable

import numpy as np

MAGIC = b"RRY5"
BUFFER_ALIGNMENT = 64
_HEADER = struct.Struct("<4sIQ")
_ENTRY = struct.Struct("<QQ")

Dumps = Callable[[object, Callable[[pickle.PickleBuffer], object]], bytes]
Loads = Callable[..., object]


def _align(n: int) -> int:
    return (n + BUFFER_ALIGNMENT - 1) & ~(BUFFER_ALIGNMENT - 1)


def _default_dumps(
    value: object, buffer_callback: Callable[[pickle.PickleBuffer], object]
) -> bytes:
    return pickle.dumps(value, protocol=5, buffer_callback=buffer_callback)


class Serialized:
    """A pickled value with its out-of-band buffers, ready to be written into a region.

    Nothing is copied until `write_to`: the buffers still point at the caller's memory, so
    the value must not be mutated in between.
    """

    def __init__(self, inband: bytes, buffers: list[pickle.PickleBuffer]) -> None:
        self.inband = inband
        self.buffers = buffers
        self._raws = [b.raw() for b in buffers]  # pickle only emits contiguous buffers
        pos = _HEADER.size + _ENTRY.size * len(buffers) + len(inband)
        self._offsets = []
        for raw in self._raws:
            pos = _align(pos)
            self._offsets.append(pos)
            pos += raw.nbytes
        self.total_size: int = pos

    def write_to(self, view: memoryview) -> None:
        """Lay the value out at the start of `view` (at least `total_size` bytes, writable)."""
        if view.nbytes < self.total_size:
            raise ValueError(f"region of {view.nbytes} bytes is too small for {self.total_size}")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        _HEADER.pack_into(view, 0, MAGIC, len(self._raws), len(self.inband))
        pos = _HEADER.size
        for offset, raw in zip(self._offsets, self._raws, strict=True):
            _ENTRY.pack_into(view, pos, offset, raw.nbytes)
            pos += _ENTRY.size
        view[pos : pos + len(self.inband)] = self.inband
        for offset, raw in zip(self._offsets, self._raws, strict=True):
            view[offset : offset + raw.nbytes] = raw

    def release(self) -> None:
        """Drop the references to the source buffers (optional; lets them be freed early)."""
        for raw in self._raws:
            raw.release()
        for b in self.buffers:
            b.release()
        self._raws = []
        self.buffers = []


def serialize(value: object, dumps: Dumps | None = None) -> Serialized:
    """Pickle `value` (protocol 5) keeping contiguous buffers out-of-band.

    `dumps(value, buffer_callback) -> bytes` replaces the default ``pickle.dumps`` (e.g. a
    cloudpickle-based pickler); it must pass `buffer_callback` to a protocol-5 pickler.
    """
    buffers: list[pickle.PickleBuffer] = []
    inband = (dumps or _default_dumps)(value, buffers.append)
    return Serialized(inband, buffers)


def deserialize(
    view: memoryview,
    on_release: Callable[[], None] | None = None,
    loads: Loads | None = None,
) -> object:
    """Rebuild the value laid out at the start of `view`, zero-copy.

    Out-of-band buffers come back as read-only views of `view` (a numpy array is a read-only
    array whose ``base`` chain ends at the shared mapping). `on_release` is called exactly
    once, as soon as no view into the region is alive any more: right away if the value holds
    none, otherwise from whichever thread drops the last reference. It is not called at
    interpreter exit. `loads(data, buffers=...)` replaces ``pickle.loads``.
    """
    view = memoryview(view)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    magic, nbuffers, inband_len = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"not a redray object region (magic {bytes(magic)!r})")
    table = _HEADER.size
    inband_start = table + _ENTRY.size * nbuffers
    inband = view[inband_start : inband_start + inband_len]
    loads = loads or pickle.loads

    if nbuffers == 0:
        try:
            return loads(inband, buffers=())
        finally:
            inband.release()
            if on_release is not None:
                on_release()

    spans = [_ENTRY.unpack_from(view, table + i * _ENTRY.size) for i in range(nbuffers)]
    if any(offset + length > view.nbytes for offset, length in spans):
        raise ValueError("corrupt object region: a buffer extends past its end")
    region = np.frombuffer(view.toreadonly(), dtype=np.uint8)
    if on_release is not None:
        finalizer = weakref.finalize(region, on_release)
        finalizer.atexit = False
    buffers = [region[offset : offset + length] for offset, length in spans]
    del region  # the buffers now hold the only references
    try:
        return loads(inband, buffers=buffers)
    finally:
        del buffers
        inband.release()
