"""sd_notify(3) for Type=notify units: READY, WATCHDOG, STOPPING, STATUS, RELOADING.

Standard library only (no libsystemd). The environment is passed in
explicitly (``Notifier.from_env(os.environ)``); nothing is read at import
time. Without $NOTIFY_SOCKET every call is a no-op, and a failed send is
logged once at WARNING and never raised: notification must not take the
daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

#: Variables meant for the main process only; drop them from a child's
#: environment so a worker cannot talk to (or be confused by) the manager.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify datagrams to one socket address (or nowhere)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # A leading '@' names a socket in the abstract namespace (a NUL byte).
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Build from $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID.

        The watchdog is ignored when WATCHDOG_PID names another process (the
        variables were inherited, not meant for us) or is malformed.
        """
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            wpid = env.get("WATCHDOG_PID")
            if wpid is not None and int(wpid) != (os.getpid() if pid is None else pid):
                usec = None
        except ValueError:
            usec = None
        return cls(env.get("NOTIFY_SOCKET"), usec if usec and usec > 0 else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        # Type=notify-reload (systemd 253+) wants MONOTONIC_USEC with RELOADING=1;
        # older systemd ignores the extra field. Send ready() when the reload is done.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def send(self, *fields: str) -> bool:
        """Send newline-joined fields in one datagram; True if it was sent."""
        if self._address is None:
            return False
        # STATUS= is one line; a newline would start a bogus field.
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "sd_notify to %r failed: %s (further errors not logged)", self._address.replace("\0", "@"), exc
                )
            return False
        return True
