"""A worker's log lines into the supervisor's log: attributed, stripped of control characters, rate-limited.

Both ways a worker can speak: Log messages on its control channel, and its
stderr, which the supervisor reads through a pipe of its own (a worker never
shares the supervisor's fd 2).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

wlog = logging.getLogger("edged.worker")


class LogGate:
    """A worker's log lines into ours: attributed, stripped of control characters, rate-limited.

    A worker runs untrusted model code: its lines must not pass for the
    supervisor's (no newlines or escapes to forge a line) nor flood the journal
    (a token bucket; what it drops is counted and said once it refills).
    """

    RATE, BURST = 20.0, 200.0  # lines per second, and the burst allowed before the rate applies

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid: int | None = None
        self.tokens = self.BURST
        self.stamp = time.monotonic()
        self.dropped = 0
        self._lock = threading.Lock()

    def emit(self, level: int, text: str, source: str = "") -> None:
        with self._lock:
            self._emit(level, text, source)

    def _emit(self, level: int, text: str, source: str) -> None:
        now = time.monotonic()
        self.tokens = min(self.BURST, self.tokens + (now - self.stamp) * self.RATE)
        self.stamp = now
        if self.tokens < 1:
            if not self.dropped:
                wlog.warning("[worker %d pid %s] logs over %d lines a second: dropping its lines until it slows",
                             self.index, self.pid, self.RATE)
            self.dropped += 1
            return
        self.tokens -= 1
        if self.dropped:
            wlog.warning("[worker %d pid %s] %d log line(s) dropped (over %d a second)", self.index, self.pid,
                         self.dropped, self.RATE)
            self.dropped = 0
        clean = text[:2000].translate(_CONTROL)
        wlog.log(level if level in _LEVELS else logging.INFO, "[worker %d pid %s%s] %s", self.index, self.pid,
                 source, clean)


_LEVELS = frozenset({logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL})
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def read_stderr(pipe: Any, logs: LogGate) -> None:
    """Until the worker's end closes: its stderr, as attributed, rate-limited lines (partial lines capped)."""
    buf = b""
    try:
        while True:
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if len(buf) > 4096:  # no newline for 4 KiB: a line of its own
                lines.append(buf)
                buf = b""
            for line in lines:
                logs.emit(logging.WARNING, line.decode("utf-8", "replace"), " stderr")
    except OSError:
        pass
    finally:
        if buf:
            logs.emit(logging.WARNING, buf.decode("utf-8", "replace"), " stderr")
        pipe.close()
