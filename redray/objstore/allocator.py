"""Best-fit free-list allocator for the object store arena.

The allocator only does bookkeeping on offsets; it never touches memory. It hands out the
smallest hole that fits (lowest address among equal sizes) and coalesces a freed block with
free neighbours. Reusing recently freed space keeps its pages faulted in, which is what makes
repeated large puts run at memory bandwidth instead of page-fault speed.
"""

from __future__ import annotations

from bisect import bisect_left, insort


class Allocator:
    """Hands out `alignment`-aligned regions of a `capacity`-byte address range.

    Free holes are indexed three ways: a sorted list of ``(size, offset)`` for best-fit
    lookup, and two dicts keyed by start and end offset for O(1) neighbour coalescing.
    """

    def __init__(self, capacity: int, alignment: int = 64) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self.used = 0
        self._allocated: dict[int, int] = {}  # offset -> block size
        self._free_by_size: list[tuple[int, int]] = []  # sorted (size, offset)
        self._free_start: dict[int, int] = {}  # offset -> size
        self._free_end: dict[int, int] = {}  # end offset -> start offset
        if self.capacity:
            self._add_hole(0, self.capacity)

    def round_up(self, size: int) -> int:
        """Block size actually reserved for a request of `size` bytes (at least one unit)."""
        a = self.alignment
        return max(a, (size + a - 1) & ~(a - 1))

    def allocate(self, size: int) -> int | None:
        """Reserve `size` bytes; return the offset, or None when no hole is big enough."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        need = self.round_up(size)
        i = bisect_left(self._free_by_size, (need, -1))
        if i == len(self._free_by_size):
            return None
        hole_size, offset = self._free_by_size[i]
        self._remove_hole(offset, hole_size, index=i)
        if hole_size > need:
            self._add_hole(offset + need, hole_size - need)
        self._allocated[offset] = need
        self.used += need
        return offset

    def free(self, offset: int) -> None:
        """Return the block at `offset`, merging it with adjacent free holes."""
        size = self._allocated.pop(offset, None)
        if size is None:
            raise KeyError(f"no allocated block at offset {offset}")
        self.used -= size
        start, end = offset, offset + size
        left = self._free_end.get(start)
        if left is not None:
            self._remove_hole(left, start - left)
            start = left
        right_size = self._free_start.get(end)
        if right_size is not None:
            self._remove_hole(end, right_size)
            end += right_size
        self._add_hole(start, end - start)

    def block_size(self, offset: int) -> int:
        """Size reserved for the allocated block at `offset`."""
        return self._allocated[offset]

    def allocations(self) -> dict[int, int]:
        """A copy of the allocated blocks as ``{offset: size}``."""
        return dict(self._allocated)

    def largest_free(self) -> int:
        """Size of the largest hole (0 when full)."""
        return self._free_by_size[-1][0] if self._free_by_size else 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def _add_hole(self, offset: int, size: int) -> None:
        insort(self._free_by_size, (size, offset))
        self._free_start[offset] = size
        self._free_end[offset + size] = offset

    def _remove_hole(self, offset: int, size: int, index: int | None = None) -> None:
        if index is None:
            index = bisect_left(self._free_by_size, (size, offset))
        del self._free_by_size[index]
        del self._free_start[offset]
        del self._free_end[offset + size]
