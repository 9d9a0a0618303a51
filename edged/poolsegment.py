"""One segment of the frame pool and the free extents inside it: the allocator's bookkeeping, no system calls.

Free extents sit in a sorted offset list (plus offset -> size), so give() finds
a freed block's neighbours by bisection and coalesces at once, and take() cuts
a block from the front of an extent. The pool (edged.pool) maps and unmaps the
segment, picks the extent, counts the bytes and holds the lock; a Segment is
mutated only under it.
"""
from __future__ import annotations

import bisect
import mmap


class Segment:
    """One mapping and its free extents; mutated only under the pool's lock."""
    __slots__ = ("base", "draining", "empty_since", "extents", "fd", "id", "live", "mm", "ready", "size", "starts")

    def __init__(self, seg_id: int, size: int, fd: int, mm: mmap.mmap | None, base: bool, now: float) -> None:
        self.id, self.size, self.fd, self.mm, self.base = seg_id, size, fd, mm, base
        self.starts: list[int] = [0]              # free extent offsets, sorted
        self.extents: dict[int, int] = {0: size}  # free extent offset -> size
        self.live, self.empty_since, self.draining, self.ready = 0, now, False, base

    def take(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        rest = self.extents.pop(start) - size
        if rest:
            self.starts[i] = start + size
            self.extents[start + size] = rest
        else:
            del self.starts[i]

    def give(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] == start + size:  # merge with the next extent
            size += self.extents.pop(self.starts.pop(i))
        if i > 0 and (prev := self.starts[i - 1]) + self.extents[prev] == start:  # and the previous one
            self.extents[prev] += size
        else:
            self.starts.insert(i, start)
            self.extents[start] = size

    def largest(self) -> int:
        return max(self.extents.values(), default=0)
