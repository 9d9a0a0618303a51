"""edged.ioloop: readiness callbacks, calls from other threads, timers, and a failing callback."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import until
from edged.ioloop import IoLoop


@pytest.fixture
def loop():
    lp = IoLoop()
    lp.start()
    yield lp
    lp.stop()
    lp.close()


def test_read_callbacks_run_on_the_loop_thread(loop):
    a, b = socket.socketpair()
    got: list[tuple[bytes, bool]] = []
    loop.call_soon(loop.watch, b, lambda: got.append((b.recv(100), loop.in_loop())))
    a.sendall(b"one")
    until(lambda: got, 5, "the first read callback", 0.005)
    a.sendall(b"two")
    until(lambda: len(got) == 2, 5, "the second read callback", 0.005)
    assert got == [(b"one", True), (b"two", True)]
    assert not loop.in_loop()
    forgotten = threading.Event()

    def forget() -> None:  # forgotten: no more callbacks
        loop.watch(b, None)
        forgotten.set()

    loop.call_soon(forget)
    assert forgotten.wait(5)
    a.sendall(b"three")
    # a sentinel: another pair, readable after b is; the round of select that reports it would report b too,
    # and a call queued from its callback runs after every callback of that round
    c, e = socket.socketpair()
    rounds_done = threading.Event()

    def on_sentinel() -> None:
        e.recv(100)
        loop.watch(e, None)
        loop.call_soon(rounds_done.set)

    loop.call_soon(loop.watch, e, on_sentinel)
    c.sendall(b"sentinel")
    assert rounds_done.wait(5)
    assert len(got) == 2
    for s in (a, b, c, e):
        s.close()


def test_write_interest_is_reported_and_can_be_dropped(loop):
    a, b = socket.socketpair()
    writable = threading.Event()

    def on_write():
        writable.set()
        loop.watch(b, lambda: None, None)  # once is enough

    loop.call_soon(loop.watch, b, lambda: None, on_write)
    assert writable.wait(5)
    a.close()
    b.close()


def test_call_soon_from_many_threads_runs_everything_once(loop):
    seen: list[int] = []
    threads = [threading.Thread(target=lambda k=k: [loop.call_soon(seen.append, k * 1000 + i) for i in range(200)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    until(lambda: len(seen) == 800, 5, "800 calls run", 0.005)
    assert sorted(seen) == sorted(k * 1000 + i for k in range(4) for i in range(200))


def test_timers_fire_in_order_and_not_early(loop):
    fired: list[tuple[str, float]] = []
    t0 = time.monotonic()
    loop.call_soon(loop.call_later, 0.15, lambda: fired.append(("late", time.monotonic() - t0)))
    loop.call_soon(loop.call_later, 0.05, lambda: fired.append(("early", time.monotonic() - t0)))
    until(lambda: len(fired) == 2, 5, "both timers", 0.005)
    assert [n for n, _ in fired] == ["early", "late"]
    assert fired[0][1] >= 0.05 and fired[1][1] >= 0.15


def test_a_failing_callback_is_logged_and_the_loop_goes_on(loop, caplog):
    done = threading.Event()
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(done.set)
    assert done.wait(5)
    assert "ZeroDivisionError" in caplog.text
    assert loop.running()


def test_after_events_runs_after_each_round(loop):
    rounds: list[int] = []
    loop.after_events(lambda: rounds.append(1))
    loop.call_soon(lambda: None)
    until(lambda: rounds, 5, "a round of events", 0.005)
