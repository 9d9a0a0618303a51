"""Separate hosts for the fleet tests: network namespaces joined to a broker host by veth links.

`Hosts` creates one namespace for the broker and one per other host, each
linked to the broker's by a veth pair on a private /24 of its own
(10.231.<i>.0/24: the broker is .1, the host .2), so no host reaches another
except through the broker, and nothing in them reaches anything outside: the
namespaces have no other interface and no route. `cut(i)` takes host i's end
of its link down: no FIN, no RST, the broker hears nothing more from it.
`close()` ends what still runs inside them (only processes in namespaces we
made) and deletes them; their veth pairs go with them.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2: `unavailable()`
says why not, for a clean skip.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess

SUBNET = "10.231"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None (a probe namespace is made and removed)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    probe = f"edprobe-{secrets.token_hex(3)}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if r.returncode != 0:
            return f"cannot make a veth pair in a namespace: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """`broker` and hosts 1..n, each on its own link to the broker's namespace."""

    def __init__(self, n: int) -> None:
        tag = secrets.token_hex(3)
        self.broker = f"edf-{tag}-b"
        self.hosts = [f"edf-{tag}-{i}" for i in range(1, n + 1)]
        self.made: list[str] = []
        try:
            self._make()
        except Exception:
            self.close()
            raise

    def _make(self) -> None:
        for ns in (self.broker, *self.hosts):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.hosts, start=1):
            _ip("-n", self.broker, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.broker, "addr", "add", f"{SUBNET}.{i}.1/24", "dev", f"h{i}")
            _ip("-n", self.broker, "link", "set", f"h{i}", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}.2/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def host(self, i: int) -> str:
        """The namespace of host i (1-based)."""
        return self.hosts[i - 1]

    @staticmethod
    def broker_address(i: int) -> str:
        """The broker's address as host i reaches it."""
        return f"{SUBNET}.{i}.1"

    def cut(self, i: int) -> None:
        """Host i's link down at its end: it sends nothing, the broker gets no FIN and no RST."""
        _ip("-n", self.host(i), "link", "set", "eth0", "down")

    def mend(self, i: int) -> None:
        _ip("-n", self.host(i), "link", "set", "eth0", "up")

    @staticmethod
    def exec_prefix(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in reversed(self.made):
            r = _ip("netns", "pids", ns, check=False)
            for pid in r.stdout.split():  # only processes inside a namespace this object made
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        self.made.clear()
