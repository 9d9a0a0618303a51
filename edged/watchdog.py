"""What the systemd watchdog vouches for: every part of the daemon showed progress within the interval.

The I/O thread, the main loop and each worker slot report progress here; the
main loop sends WATCHDOG=1 only when all of them did (idle counts: the I/O
loop beats from a timer of its own, an idle worker answers heartbeats).
Otherwise the pings stop, systemd restarts the daemon, and status names the
part that stalled.
"""
from __future__ import annotations

import time


class Progress:
    def __init__(self) -> None:
        now = time.monotonic()
        self.beats: dict[str, float] = {"io loop": now, "main loop": now}

    def beat(self, part: str) -> None:
        self.beats[part] = time.monotonic()

    def stalled(self, now: float, limit: float) -> list[str]:
        return [f"{part} (silent for {now - t:.1f} s)" for part, t in self.beats.items() if now - t > limit]
