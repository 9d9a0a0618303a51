"""Property tests of edged.pool: random alloc/free/maintain sequences keep the bookkeeping sound.

The allocator-only run (backing="none") explores many long sequences quickly; the memfd run is
smaller but writes a distinct pattern into every block and checks it is never disturbed, which
catches overlapping blocks in real memory.
"""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edged.pool import ALIGN, PAGE, FramePool

KiB, MiB = 1 << 10, 1 << 20
FRAME_SIZES = [20 * KiB, 49152, 150528, 270000, 100 * KiB, 300 * KiB, MiB, 6 * MiB]


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class PoolMachine(RuleBasedStateMachine):
    backing = "none"
    geometry = dict(initial_bytes=MiB, segment_bytes=4 * MiB, max_bytes=24 * MiB)
    lengths = st.one_of(st.sampled_from(FRAME_SIZES), st.integers(1, 8 * MiB), st.integers(0, 4 * KiB))

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.announced: set[int] = {0}   # the base needs no announcement
        self.pool = FramePool(**self.geometry, idle_release_s=5.0, frag_threshold=0.5, frag_window_s=3.0,
                              backing=self.backing, clock=self.clock,
                              on_segment_added=lambda i, fd, size: self.announced.add(i),
                              on_segment_released=self.announced.remove)
        self.live: list[tuple] = []     # (block, expected bytes or None)
        self.tag = 0

    def _fill(self, length: int):
        return self.pool.alloc(length), None

    @rule(data=st.data())
    def alloc(self, data) -> None:
        self._alloc(data.draw(self.lengths))

    @rule(data=st.data(), n=st.integers(2, 12))
    def alloc_burst(self, data, n: int) -> None:
        for _ in range(n):
            self._alloc(data.draw(self.lengths))
            self.pool._check_invariants()

    def _alloc(self, length: int) -> None:
        before = self.pool.stats()
        block, expected = self._fill(length)
        if block is None:   # only when no extent fits and growth would pass max_bytes
            need = _round_up(_round_up(max(length, 1), ALIGN), PAGE)
            assert before["capacity_bytes"] + need > self.geometry["max_bytes"]
            assert self.pool.stats()["failed_allocs"] == before["failed_allocs"] + 1
        else:
            assert block.length == length and block.size >= length and block.offset % ALIGN == 0
            self.live.append((block, expected))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 1 << 16))
    def free(self, i: int) -> None:
        block, _ = self.live.pop(i % len(self.live))
        self.pool.free(block)

    @precondition(lambda self: self.live)
    @rule(picks=st.lists(st.integers(0, 1 << 16), min_size=2, max_size=12))
    def free_burst(self, picks: list[int]) -> None:
        for i in picks:
            if self.live:
                self.free(i)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 6.0]))
    def maintain(self, dt: float) -> None:
        self.clock.t += dt
        self.pool.maintain()
        alive = {seg_id for seg_id, _, _ in self.pool.segments()}
        assert all(b.segment in alive for b, _ in self.live), "shrink freed a live block"

    @invariant()
    def consistent(self) -> None:
        self.pool._check_invariants()
        st_ = self.pool.stats()
        assert st_["live_blocks"] == len(self.live)
        assert st_["used_bytes"] == sum(b.size for b, _ in self.live) <= st_["high_water_bytes"]
        assert st_["capacity_bytes"] <= self.geometry["max_bytes"] and 0.0 <= st_["fragmentation"] <= 1.0
        assert {seg_id for seg_id, _, _ in self.pool.segments()} == self.announced  # callbacks kept in step

    def teardown(self) -> None:
        self.pool.close()


class MemfdPoolMachine(PoolMachine):
    backing = "memfd"
    geometry = dict(initial_bytes=256 * KiB, segment_bytes=MiB, max_bytes=3 * MiB)
    lengths = st.one_of(st.sampled_from([20 * KiB, 49152, 150528, 270000]), st.integers(0, 600 * KiB))

    def _fill(self, length: int):
        self.tag += 1
        expected = bytes([self.tag % 251 + 1]) * length
        return self.pool.write(expected), expected

    @invariant()
    def contents_unchanged(self) -> None:
        for block, expected in self.live:
            with self.pool.view(block) as mv:
                assert mv == expected, f"{block} was overwritten"


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
MemfdPoolMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestPoolAllocatorOnly = PoolMachine.TestCase
TestPoolMemfd = MemfdPoolMachine.TestCase
