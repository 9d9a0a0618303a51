"""The supervisor's shared-memory frame pool (stdlib only, so the supervisor stays light).

Owns the memfd segments frames travel in (create, map, unmap), the allocator
bookkeeping inside them, growth up to ``max_bytes``, release of idle grown
segments and the response to fragmentation. Handing fds to workers is the
supervisor's, from ``on_segment_added(id, fd, size)`` / ``on_segment_released(id)``,
which run outside the lock. No other alloc uses a grown segment before its
on_segment_added returns, so no block reaches a worker before its segment; if
the callback raises, alloc re-raises and the unused segment goes by the idle
rule. The base segment is not announced: read it from segments().

Allocator: 64-byte aligned blocks; per segment (edged.poolsegment), free extents sit in a sorted
offset list (plus offset -> size), so free() finds its neighbours by bisection
and coalesces at once. Best-fit over all extents, ties to the oldest segment:
frames in flight are few, so the scan is short, and best-fit keeps big extents
whole for the 1-6 MB frames among small JPEGs and tensors, while packing old
segments lets young ones empty and go.

Growth: when nothing fits, add max(segment_bytes, request rounded up to a
multiple of it), cut to the room left under max_bytes if that still fits the
request; else alloc returns None. The first segment (initial_bytes; 0 = none)
is the base and lives until close(). maintain() unmaps grown segments empty for
idle_release_s and closes their fds, so RSS really drops.

Fragmentation is 1 - largest free extent / free bytes, over the whole pool (so
free space split across segments counts too). Compaction is impossible (workers
hold offsets), so when it stays above frag_threshold for frag_window_s with more
than one segment, maintain() marks the non-base segment with the most free bytes
outside its own largest extent as *draining*: allocs avoid it unless no other
segment fits (it still beats growing), its short-lived frames drain away and the
idle rule releases it. Each action is logged at INFO, counted in ``recycles``,
and restarts the window.

Segments a worker maps are read-only to it: each memfd is sealed against
growing, shrinking and further writes once the pool has mapped it, and the fd
handed out (segments(), on_segment_added) is a read-only reopen of it; see
edged.memfd. Only the pool's own mapping can change a frame.

Blocks are values: a stale copy of a freed block that equals a block since
allocated at the same place cannot be told from it (that double free goes unseen).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from typing import Any, NamedTuple
from collections.abc import Callable

from edged import memfd
from edged.errors import PoolError
from edged.poolsegment import Segment

log = logging.getLogger(__name__)

ALIGN = 64
PAGE = mmap.PAGESIZE


class Block(NamedTuple):
    """A frame's place in the pool: ``size`` is the 64-aligned capacity, ``length`` the bytes asked for."""
    segment: int
    offset: int
    size: int
    length: int


class Lease:
    """A frame's hold on one block: release() gives it back exactly once (a second call does nothing)."""

    __slots__ = ("block", "pool")

    def __init__(self, pool: FramePool, block: Block) -> None:
        self.pool = pool
        self.block: Block | None = block

    def release(self) -> None:
        block, self.block = self.block, None
        if block is not None:
            self.pool.free(block)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _unmap(seg: Segment) -> None:
    """Unmap a segment and close its fd; a view still held keeps the mapping until it is dropped."""
    if seg.mm is not None:
        try:
            seg.mm.close()
        except BufferError:  # a view() is still held: the mapping goes when the last one is dropped
            log.warning("segment %d still has exported views; unmap deferred to their release", seg.id)
        seg.mm = None
    if seg.fd >= 0:
        os.close(seg.fd)
        seg.fd = -1


class FramePool:
    """Variable-size, 64-byte aligned frame blocks in growable shared-memory segments."""

    def __init__(self, *, initial_bytes: int = 1 << 20, max_bytes: int = 256 << 20, segment_bytes: int = 4 << 20,
                 idle_release_s: float = 10.0, frag_threshold: float = 0.5, frag_window_s: float = 10.0,
                 backing: str = "memfd", on_segment_added: Callable[[int, int, int], Any] | None = None,
                 on_segment_released: Callable[[int], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if backing not in ("memfd", "none"):
            raise PoolError(f"backing must be 'memfd' or 'none', not {backing!r}")
        if initial_bytes < 0 or segment_bytes <= 0 or max_bytes < _round_up(initial_bytes, PAGE):
            raise PoolError(f"need 0 <= initial_bytes <= max_bytes and segment_bytes > 0 "
                            f"(got {initial_bytes}, {max_bytes}, {segment_bytes})")
        self._max = max_bytes
        self._seg_bytes = _round_up(segment_bytes, PAGE)
        self._idle_s, self._frag_thr, self._frag_win = idle_release_s, frag_threshold, frag_window_s
        self._backing = backing
        self._on_added, self._on_released = on_segment_added, on_segment_released
        self._clock = clock
        self._lock = threading.Lock()
        self._segs: dict[int, Segment] = {}
        self._live: dict[tuple[int, int], Block] = {}
        self._next_id = 0
        self._capacity = self._used = self._high_water = 0
        self._grows = self._shrinks = self._failed = self._recycles = 0
        self._frag_since: float | None = None
        self._closed = False
        if initial_bytes:
            self._new_segment(_round_up(initial_bytes, PAGE), base=True)

    def alloc(self, length: int) -> Block | None:
        """A block of at least ``length`` bytes, or None when max_bytes leaves no room."""
        if length < 0:
            raise PoolError(f"negative length {length}")
        size = _round_up(max(length, 1), ALIGN)
        added: Segment | None = None
        with self._lock:
            if self._closed:
                raise PoolError("pool is closed")
            place = self._best_fit(size)
            if place is None and (added := self._grow(size)) is not None:
                place = (added, 0)
            if place is None:
                self._failed += 1
                log.debug("alloc of %d bytes failed: capacity %d of max %d", length, self._capacity, self._max)
                return None
            seg, start = place
            seg.take(start, size)
            seg.live += 1
            block = Block(seg.id, start, size, length)
            self._live[(seg.id, start)] = block
            self._used += size
            self._high_water = max(self._high_water, self._used)
        if added is not None:
            self._announce(added, block)
        return block

    def write(self, data: Any) -> Block | None:
        """Alloc a block for a contiguous bytes-like and copy it in, once. None when it does not fit."""
        if self._backing == "none":
            raise PoolError("write needs real memory; this pool has backing='none'")
        src = memoryview(data)
        if src.ndim != 1 or src.itemsize != 1:
            src = src.cast("B")
        block = self.alloc(src.nbytes)
        if block is not None:
            with self._lock:
                mm = self._segment_of(block).mm
            mm[block.offset:block.offset + block.length] = src  # type: ignore[index]
        return block

    def lease(self, data: Any) -> Lease | None:
        """The payload copied into a block that the returned Lease owns; None when it does not fit."""
        block = self.write(data) if len(data) else self.alloc(1)
        return Lease(self, block) if block is not None else None

    def segment(self, seg_id: int) -> tuple[int, int] | None:
        """(fd, size) of a live segment, by id; None once it is gone."""
        with self._lock:
            seg = self._segs.get(seg_id)
            return (seg.fd, seg.size) if seg is not None else None

    def view(self, block: Block) -> memoryview:
        """Writable view of exactly ``block.length`` bytes; release() it before the block is freed."""
        with self._lock:
            seg = self._segment_of(block)
            if seg.mm is None:
                raise PoolError("view needs real memory; this pool has backing='none'")
            return memoryview(seg.mm)[block.offset:block.offset + block.length]

    def free(self, block: Block) -> None:
        """Give a live block back. Double and foreign frees raise PoolError; after close() it is a no-op."""
        with self._lock:
            if self._closed:
                return
            seg = self._segment_of(block)
            del self._live[(block.segment, block.offset)]
            seg.give(block.offset, block.size)
            seg.live -= 1
            self._used -= block.size
            if seg.live == 0:
                seg.empty_since = self._clock()

    def maintain(self, now: float | None = None) -> None:
        """Release grown segments idle for idle_release_s and act on lasting fragmentation (~1/s)."""
        now = self._clock() if now is None else now
        gone: list[Segment] = []
        with self._lock:
            if self._closed:
                return
            for seg in list(self._segs.values()):
                if not seg.base and seg.live == 0 and now - seg.empty_since >= self._idle_s:
                    del self._segs[seg.id]
                    self._capacity -= seg.size
                    self._shrinks += 1
                    gone.append(seg)
            self._watch_fragmentation(now)
        for seg in gone:
            _unmap(seg)
            log.info("released segment %d (%d bytes) after %.1f s idle", seg.id, seg.size, now - seg.empty_since)
            if self._on_released is not None:
                self._on_released(seg.id)

    def segments(self) -> list[tuple[int, int, int]]:
        """(id, fd, size) of the live segments, base first; fd is -1 with backing='none'.

        The fd is read-only and sealed (edged.memfd): map it with PROT_READ.
        """
        with self._lock:
            return [(s.id, s.fd, s.size) for s in self._segs.values()]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"capacity_bytes": self._capacity, "used_bytes": self._used,
                    "high_water_bytes": self._high_water, "fragmentation": round(self._fragmentation(), 4),
                    "grows": self._grows, "shrinks": self._shrinks, "failed_allocs": self._failed,
                    "segments": len(self._segs), "recycles": self._recycles, "live_blocks": len(self._live)}

    def close(self) -> None:
        """Unmap everything; on_segment_released fires for grown segments. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            segs = list(self._segs.values())
            self._segs.clear()
            self._live.clear()
            self._capacity = self._used = 0
        for seg in segs:
            _unmap(seg)
            if not seg.base and self._on_released is not None:
                self._on_released(seg.id)

    def __enter__(self) -> FramePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _announce(self, seg: Segment, block: Block) -> None:
        try:
            if self._on_added is not None:
                self._on_added(seg.id, seg.fd, seg.size)
        except BaseException:
            self.free(block)  # the segment stays hidden, so empty, and the idle rule releases it
            raise
        with self._lock:
            seg.ready = True

    def _segment_of(self, block: Block) -> Segment:
        if not isinstance(block, Block) or self._live.get((block.segment, block.offset)) != block:
            raise PoolError(f"{block!r} is not a live block of this pool (double free or foreign)")
        return self._segs[block.segment]

    def _best_fit(self, size: int) -> tuple[Segment, int] | None:
        """Tightest extent outside draining segments, else tightest inside them; ties to the oldest."""
        best = spare = None
        best_size = spare_size = 0
        for seg in self._segs.values():
            for start, ext in seg.extents.items() if seg.ready else ():
                if ext < size:
                    continue
                if seg.draining:
                    if spare is None or ext < spare_size:
                        spare, spare_size = (seg, start), ext
                elif best is None or ext < best_size:
                    best, best_size = (seg, start), ext
                    if ext == size:
                        return best
        return best or spare

    def _grow(self, size: int) -> Segment | None:
        want = max(self._seg_bytes, _round_up(size, self._seg_bytes))
        room = self._max - self._capacity
        if want > room:
            want = room // PAGE * PAGE
            if want < size:
                return None
        self._grows += 1
        seg = self._new_segment(want, base=False)
        log.info("grew pool by segment %d (%d bytes), capacity now %d", seg.id, want, self._capacity)
        return seg

    def _new_segment(self, size: int, *, base: bool) -> Segment:
        seg_id, self._next_id = self._next_id, self._next_id + 1
        fd, mm = -1, None
        if self._backing == "memfd":
            try:
                fd, mm = memfd.segment(f"edged-pool-{seg_id}", size)
            except OSError as exc:
                raise PoolError(f"cannot map a {size}-byte segment: {exc}") from exc
        seg = Segment(seg_id, size, fd, mm, base, self._clock())
        self._segs[seg_id] = seg
        self._capacity += size
        return seg

    def _fragmentation(self) -> float:
        free = self._capacity - self._used
        largest = max((s.largest() for s in self._segs.values()), default=0)
        return 1.0 - largest / free if free else 0.0

    def _watch_fragmentation(self, now: float) -> None:
        if self._fragmentation() <= self._frag_thr or len(self._segs) < 2:
            self._frag_since = None
            return
        self._frag_since = now if self._frag_since is None else self._frag_since
        if now - self._frag_since < self._frag_win:
            return
        self._frag_since = None
        score, victim = max(((sum(s.extents.values()) - s.largest(), s) for s in self._segs.values()
                             if not s.base and not s.draining), key=lambda sv: sv[0], default=(0, None))
        if victim is not None and score > 0:
            victim.draining = True
            self._recycles += 1
            log.info("fragmentation %.2f for %.0f s: draining segment %d (%d free bytes outside its largest "
                     "extent)", self._fragmentation(), self._frag_win, victim.id, score)

    def _check_invariants(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent (tests call this)."""
        def fail(msg: str) -> None:
            raise AssertionError(msg)
        with self._lock:
            by_seg: dict[int, list[tuple[int, int]]] = {i: [] for i in self._segs}
            for (sid, off), b in self._live.items():
                if (sid, off) != (b.segment, b.offset) or sid not in by_seg:
                    fail(f"live block {b} is keyed wrongly or lies in a released segment")
                if off % ALIGN or b.size % ALIGN or b.size < b.length or b.size <= 0:
                    fail(f"block {b} is misaligned or too small")
                by_seg[sid].append((off, b.size))
            for seg in self._segs.values():
                if seg.starts != sorted(seg.extents) or seg.live != len(by_seg[seg.id]):
                    fail(f"segment {seg.id}: free offsets or live count out of sync")
                for lo, hi in zip(seg.starts, seg.starts[1:], strict=False):
                    if lo + seg.extents[lo] >= hi:
                        fail(f"segment {seg.id}: free extents at {lo} and {hi} touch or overlap (not coalesced)")
                pos = 0
                for off, size in sorted(by_seg[seg.id] + list(seg.extents.items())):
                    if off != pos or size <= 0:
                        fail(f"segment {seg.id}: byte {pos} is covered {'twice' if off < pos else 'never'}")
                    pos = off + size
                if pos != seg.size:
                    fail(f"segment {seg.id}: covered up to {pos} of {seg.size}")
            if self._used != sum(b.size for b in self._live.values()) or \
                    self._capacity != sum(s.size for s in self._segs.values()):
                fail(f"used_bytes {self._used} or capacity_bytes {self._capacity} is not the sum of its parts")
