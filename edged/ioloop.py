"""The supervisor's I/O thread: one selector for the broker socket and every worker channel.

A frame arrives on the broker socket, is admitted and handed to a worker, its
result comes back on the worker's channel and goes out on the broker socket,
all on this one thread. With paho's own network thread and a reader thread
per worker, every frame crossed threads three times (a wake-up, a GIL hand-off
and, for each publish, a byte through paho's wake-up socketpair); on a 2-core
device those hand-offs cost about as much as the work itself.

Callbacks run on the loop thread and must not block: anything slow (a TCP
connect, reaping a process) goes to a helper thread that comes back with
call_soon().
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from typing import Any
from collections.abc import Callable

logger = logging.getLogger(__name__)


class IoLoop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._timers: list[tuple[float, int, Callable[[], Any]]] = []
        self._tick = itertools.count()
        self._after: list[Callable[[], Any]] = []  # run after every round of events (flushes)
        self._stop = False
        self.thread: threading.Thread | None = None
        self.ident: int | None = None

    # ---- registration (loop thread, or before start) -----------------------
    def watch(self, fileobj: Any, on_read: Callable[[], Any] | None, on_write: Callable[[], Any] | None = None) -> None:
        """Call on_read/on_write when fileobj is readable/writable; both None forgets it."""
        events = (selectors.EVENT_READ if on_read else 0) | (selectors.EVENT_WRITE if on_write else 0)
        try:
            key = self.sel.get_key(fileobj)
        except (KeyError, ValueError):
            key = None
        if not events:
            if key is not None:
                self.sel.unregister(fileobj)
            return
        if key is None:
            self.sel.register(fileobj, events, (on_read, on_write))
        else:
            self.sel.modify(fileobj, events, (on_read, on_write))

    def after_events(self, fn: Callable[[], Any]) -> None:
        """Run fn after each round of events and calls (for output that callbacks queued)."""
        self._after.append(fn)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Loop thread only: run fn once, `delay` seconds from now."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._tick), fn))

    # ---- from any thread -----------------------------------------------------
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self._stop

    def in_loop(self) -> bool:
        return threading.get_ident() == self.ident

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on the loop thread (thread-safe)."""
        self._calls.append((fn, args))
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a full pipe wakes the loop just as well

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="io", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def close(self) -> None:
        self.sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- the loop ----------------------------------------------------------------
    def run(self) -> None:
        self.ident = threading.get_ident()
        while not self._stop:
            timeout = 1.0
            if self._calls:
                timeout = 0.0
            elif self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                on_read, on_write = key.data
                if mask & selectors.EVENT_READ and on_read is not None:
                    self._guard(on_read)
                if mask & selectors.EVENT_WRITE and on_write is not None:
                    self._guard(on_write)
            while self._calls:
                fn, args = self._calls.popleft()
                self._guard(fn, *args)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                self._guard(fn)
            for fn in self._after:
                self._guard(fn)

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # one bad callback must not take the daemon's I/O down
            logger.exception("I/O loop callback %r failed", fn)
