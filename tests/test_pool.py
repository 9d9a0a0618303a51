"""Unit tests of edged.pool: allocator, growth, release, fragmentation response, memfd plumbing."""
from __future__ import annotations

import logging
import mmap
import os

import pytest

from edged.errors import EdgedError
from edged.pool import ALIGN, Block, FramePool, PoolError

MiB = 1 << 20


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def small_pool(**kw) -> FramePool:
    """Allocator-only pool with a 4 KiB base and 4 KiB segments: 64 blocks of 64 B each."""
    args = dict(initial_bytes=4096, segment_bytes=4096, max_bytes=3 * 4096, backing="none",
                idle_release_s=10.0, frag_window_s=10.0, clock=FakeClock())
    args.update(kw)
    return FramePool(**args)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


# -- alloc / free / coalesce -------------------------------------------------------------------

def test_alloc_small_length_rounds_to_64_aligned_block():
    with small_pool() as pool:
        a, b = pool.alloc(1), pool.alloc(65)
        assert (a.size, a.length, b.size, b.length) == (64, 1, 128, 65)
        assert a.offset % ALIGN == 0 and b.offset % ALIGN == 0 and a.offset != b.offset
        assert pool.stats()["used_bytes"] == 192
        pool._check_invariants()


def test_alloc_negative_length_raises_poolerror():
    with small_pool() as pool, pytest.raises(PoolError):
        pool.alloc(-1)


def test_free_neighbours_coalesces_into_one_extent():
    with small_pool() as pool:
        blocks = [pool.alloc(64) for _ in range(64)]
        assert pool.stats()["used_bytes"] == 4096
        for b in blocks[1::2] + blocks[0::2]:
            pool.free(b)
            pool._check_invariants()
        st = pool.stats()
        assert (st["used_bytes"], st["live_blocks"], st["fragmentation"]) == (0, 0, 0.0)
        assert pool.alloc(4096) == Block(0, 0, 4096, 4096)  # one extent again: the whole base fits


def test_alloc_after_holes_picks_best_fit():
    with small_pool() as pool:
        blocks = [pool.alloc(256) for _ in range(16)]
        pool.free(blocks[2])                                   # 256-byte hole
        pool.free(blocks[5]), pool.free(blocks[6])             # 512-byte hole
        b = pool.alloc(200)
        assert b.offset == blocks[2].offset                    # the tightest hole, not the first big one
        pool._check_invariants()


def test_free_twice_raises_poolerror():
    with small_pool() as pool:
        b = pool.alloc(100)
        pool.free(b)
        with pytest.raises(PoolError):
            pool.free(b)
        assert issubclass(PoolError, EdgedError)


def test_free_foreign_block_raises_poolerror():
    with small_pool() as pool:
        b = pool.alloc(100)
        for bad in (Block(0, b.offset + 64, 64, 64), Block(7, 0, 128, 100), Block(0, b.offset, 64, 100), "x"):
            with pytest.raises(PoolError):
                pool.free(bad)
        pool.free(b)
        pool._check_invariants()


# -- real memory ------------------------------------------------------------------------------

def test_write_bytes_round_trips_through_mmap():
    with FramePool(initial_bytes=MiB) as pool:
        payload = os.urandom(150528)
        b = pool.write(payload)
        assert b.length == len(payload) and b.size == 150528
        with pool.view(b) as mv:
            assert len(mv) == len(payload) and mv == payload
            mv[:4] = b"edge"                                   # writable
        _, fd, _ = pool.segments()[0]
        assert os.pread(fd, 4, b.offset) == b"edge"            # the same bytes another mapping of the fd sees
        pool.free(b)


def test_write_non_byte_buffer_copies_raw_bytes():
    import array
    with FramePool(initial_bytes=MiB) as pool:
        arr = array.array("f", [1.0, 2.0, 3.0])
        b = pool.write(arr)
        with pool.view(b) as mv:
            assert b.length == 12 and mv == arr.tobytes()


def test_view_freed_block_raises_poolerror():
    with FramePool(initial_bytes=MiB) as pool:
        b = pool.alloc(10)
        pool.free(b)
        with pytest.raises(PoolError):
            pool.view(b)


def test_write_backing_none_raises_poolerror():
    with small_pool() as pool, pytest.raises(PoolError):
        pool.write(b"abc")


# -- growth and its limit ---------------------------------------------------------------------

def test_alloc_past_base_grows_segment_and_calls_back_with_real_fd():
    added = []
    with FramePool(initial_bytes=MiB, segment_bytes=4 * MiB, max_bytes=64 * MiB,
                   on_segment_added=lambda *a: added.append((a, os.fstat(a[1]).st_size))) as pool:
        base = pool.alloc(MiB)
        big = pool.alloc(5 * MiB)                              # rounds up to 2 segment_bytes
        assert big.segment == 1 and base.segment == 0
        assert added == [((1, pool.segments()[1][1], 8 * MiB), 8 * MiB)]
        other = mmap.mmap(os.dup(pool.segments()[1][1]), 8 * MiB, access=mmap.ACCESS_READ)  # as a worker maps it
        pool.write(b"x")                                       # lands in segment 1 (base is full)
        with pool.view(big) as mv:
            mv[:3] = b"abc"
        assert other[big.offset:big.offset + 3] == b"abc"
        other.close()
        st = pool.stats()
        assert (st["grows"], st["segments"], st["capacity_bytes"]) == (1, 2, 9 * MiB)
        pool._check_invariants()


def test_alloc_during_announcement_never_uses_unannounced_segment():
    pool_ref, inner = [], []

    def announce(seg_id: int, fd: int, size: int) -> None:
        if seg_id == 1:                                        # another thread allocating meanwhile
            inner.append(pool_ref[0].alloc(64))

    with small_pool(max_bytes=4 * 4096, on_segment_added=announce) as pool:
        pool_ref.append(pool)
        pool.alloc(4096)                                       # base full
        outer = pool.alloc(64)                                 # grows segment 1, announces it
        assert outer.segment == 1 and inner[0].segment == 2    # inner could not use segment 1 yet
        assert pool.alloc(64).segment == 1                     # announced now: used again
        pool._check_invariants()


def test_alloc_announcement_raises_reraises_and_segment_idles_out():
    clock = FakeClock()

    def announce(seg_id: int, fd: int, size: int) -> None:
        if seg_id == 1:
            raise OSError("worker socket gone")

    with small_pool(clock=clock, on_segment_added=announce) as pool:
        pool.alloc(4096)
        with pytest.raises(OSError):
            pool.alloc(64)
        assert pool.stats()["live_blocks"] == 1
        assert pool.alloc(64).segment == 2                     # segment 1 stays unused
        clock.t += 10
        pool.maintain()
        assert [s[0] for s in pool.segments()] == [0, 2]
        pool._check_invariants()


def test_alloc_at_max_bytes_returns_none_and_counts_failure():
    with small_pool(max_bytes=3 * 4096) as pool:
        assert pool.alloc(3 * 4096 + 1) is None               # larger than max_bytes
        blocks = [pool.alloc(4096) for _ in range(3)]
        assert all(blocks) and pool.stats()["grows"] == 2
        assert pool.alloc(1) is None
        st = pool.stats()
        assert (st["failed_allocs"], st["capacity_bytes"], st["high_water_bytes"]) == (2, 3 * 4096, 3 * 4096)


def test_grow_near_max_bytes_cuts_segment_to_room_left():
    with small_pool(segment_bytes=8192, max_bytes=4096 + 6144) as pool:
        pool.alloc(4096)
        b = pool.alloc(100)                                    # wants 8192; 6144 left, cut to 4096 (pages)
        c = pool.alloc(4096)                                   # 2048 left: less than a page, nothing grows
        assert b.segment == 1 and c is None and pool.segments()[1][2] == 4096
        assert pool.alloc(6144) is None and pool.stats()["failed_allocs"] == 2


def test_init_max_below_initial_raises_poolerror():
    with pytest.raises(PoolError):
        FramePool(initial_bytes=8192, max_bytes=4096, backing="none")


# -- idle release ------------------------------------------------------------------------------

def test_maintain_after_idle_releases_empty_grown_segment_only():
    clock, released = FakeClock(), []
    with small_pool(clock=clock, on_segment_released=released.append) as pool:
        base = pool.alloc(4096)
        _live, drop = pool.alloc(4096), pool.alloc(4096)        # segments 1 and 2
        pool.free(drop)
        pool.free(base)
        clock.t += 9.9
        pool.maintain()
        assert pool.stats()["segments"] == 3
        clock.t += 0.1
        pool.maintain()
        assert [s[0] for s in pool.segments()] == [0, 1] and released == [2]
        clock.t += 1000
        pool.maintain()                                        # the live block pins segment 1; base never goes
        assert [s[0] for s in pool.segments()] == [0, 1]
        assert pool.stats()["shrinks"] == 1
        pool._check_invariants()


def test_alloc_into_empty_segment_resets_its_idle_timer():
    clock = FakeClock()
    with small_pool(clock=clock) as pool:
        pool.alloc(4096)
        b = pool.alloc(4096)
        pool.free(b)
        clock.t += 8
        b = pool.alloc(4096)
        clock.t += 8
        pool.free(b)
        clock.t += 8
        pool.maintain()
        assert pool.stats()["segments"] == 2                  # empty for 8 s only


def test_maintain_after_idle_drops_rss_of_released_segments():
    with FramePool(initial_bytes=MiB, segment_bytes=4 * MiB, max_bytes=256 * MiB, idle_release_s=0.0) as pool:
        before = rss_bytes()
        blocks = [pool.write(b"\xa5" * (4 * MiB)) for _ in range(16)]   # 64 MiB in 16 grown segments
        touched = rss_bytes()
        assert touched - before > 56 * MiB
        for b in blocks:
            pool.free(b)
        pool.maintain()
        after = rss_bytes()
        assert pool.stats()["shrinks"] == 16
        assert touched - after > 56 * MiB, (before, touched, after)


def test_release_with_view_still_held_defers_unmap_without_error(caplog):
    with FramePool(initial_bytes=0, segment_bytes=64 * 1024, idle_release_s=0.0) as pool:
        b = pool.write(b"abc")
        mv = pool.view(b)
        pool.free(b)
        with caplog.at_level(logging.WARNING, logger="edged.pool"):
            pool.maintain()
        assert "deferred" in caplog.text and pool.segments() == []
        assert mv[:3] == b"abc"                                # still mapped until the view goes
        mv.release()


# -- fragmentation and recycling ---------------------------------------------------------------

def test_fragmentation_alternate_holes_gives_expected_figure():
    with small_pool() as pool:
        blocks = [pool.alloc(64) for _ in range(64)]
        assert pool.stats()["fragmentation"] == 0.0           # no free bytes at all
        for b in blocks[::2]:
            pool.free(b)
        assert pool.stats()["fragmentation"] == round(1 - 64 / 2048, 4)
        pool.free(blocks[1])                                   # 3 blocks coalesce: largest 192 of 2112
        assert pool.stats()["fragmentation"] == round(1 - 192 / 2112, 4)


def _fragment_segment_one(pool: FramePool) -> list[Block]:
    """Fill base and segment 1 with 64-byte blocks, then punch 32 holes into segment 1."""
    base = [pool.alloc(64) for _ in range(64)]
    seg1 = [pool.alloc(64) for _ in range(64)]
    assert {b.segment for b in base} == {0} and {b.segment for b in seg1} == {1}
    pool.free(base[0])
    for b in seg1[::2]:
        pool.free(b)
    return seg1[1::2]


def test_maintain_lasting_fragmentation_drains_segment_and_recycles(caplog):
    clock = FakeClock()
    with small_pool(clock=clock, max_bytes=4 * 4096) as pool:
        left = _fragment_segment_one(pool)
        assert pool.stats()["fragmentation"] > 0.5
        with caplog.at_level(logging.INFO, logger="edged.pool"):
            pool.maintain()
            clock.t += 9
            pool.maintain()
            assert pool.stats()["recycles"] == 0              # not for the whole window yet
            clock.t += 1
            pool.maintain()
        assert pool.stats()["recycles"] == 1
        assert sum("draining segment 1" in r.getMessage() for r in caplog.records) == 1
        assert pool.alloc(64).segment == 0                     # avoids the draining segment
        b = pool.alloc(64)
        assert b.segment == 1 and pool.stats()["grows"] == 1   # nothing else fits: drained one beats growing
        for x in left + [b]:
            pool.free(x)
        clock.t += 10
        pool.maintain()
        st = pool.stats()
        assert (st["segments"], st["shrinks"], st["recycles"]) == (1, 1, 1)
        pool._check_invariants()


def test_maintain_fragmentation_dips_below_threshold_restarts_window():
    clock = FakeClock()
    with small_pool(clock=clock) as pool:
        _fragment_segment_one(pool)
        pool.maintain()                                        # window opens at t
        fill = [pool.alloc(64) for _ in range(33)]             # every hole filled: no free bytes, 0.0
        clock.t += 5
        pool.maintain()
        for b in fill:                                         # the same holes again
            pool.free(b)
        clock.t += 5
        pool.maintain()                                        # window reopens at t + 10
        clock.t += 9
        pool.maintain()
        assert pool.stats()["recycles"] == 0 and pool.stats()["grows"] == 1
        clock.t += 1
        pool.maintain()
        assert pool.stats()["recycles"] == 1


def test_maintain_single_segment_fragmented_never_recycles():
    clock = FakeClock()
    with small_pool(clock=clock) as pool:
        blocks = [pool.alloc(64) for _ in range(64)]
        for b in blocks[::2]:
            pool.free(b)
        for _ in range(30):
            clock.t += 1
            pool.maintain()
        assert pool.stats()["recycles"] == 0


# -- close --------------------------------------------------------------------------------------

def test_close_twice_is_safe_and_releases_all():
    released = []
    pool = FramePool(initial_bytes=MiB, segment_bytes=MiB, on_segment_released=released.append)
    b = pool.alloc(2 * MiB)
    fds = [fd for _, fd, _ in pool.segments()]
    pool.close()
    pool.close()
    assert released == [b.segment] and pool.segments() == [] and pool.stats()["capacity_bytes"] == 0
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    pool.free(b)                                               # no-op after close
    with pytest.raises(PoolError):
        pool.alloc(1)


# -- threads -----------------------------------------------------------------------------------

def test_alloc_free_from_threads_keeps_bookkeeping_consistent():
    import random
    import threading

    errors: list[BaseException] = []
    with FramePool(initial_bytes=MiB, segment_bytes=MiB, max_bytes=16 * MiB, backing="none",
                   idle_release_s=0.0) as pool:
        def worker(seed: int) -> None:
            rng, mine = random.Random(seed), []
            try:
                for _ in range(3000):
                    if mine and (len(mine) > 8 or rng.random() < 0.5):
                        pool.free(mine.pop(rng.randrange(len(mine))))
                    elif (b := pool.alloc(rng.choice([20_000, 150528, 270000, 900_000]))) is not None:
                        mine.append(b)
                    if rng.random() < 0.01:
                        pool.maintain()
                for b in mine:
                    pool.free(b)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        pool._check_invariants()
        assert pool.stats()["used_bytes"] == 0 and pool.stats()["live_blocks"] == 0
