"""A local Mosquitto for tests, bench and soak: one broker of our own on a free loopback port.

Owns finding the `mosquitto` binary, picking the port, writing the config (loopback listener,
anonymous, a deep per-client queue, TCP_NODELAY, optional persistence, extra lines), starting it
and waiting until it listens (with a deadline), and stopping it (SIGTERM, then SIGKILL). A broker
can be stopped and started again on the same port and persistence store, as a broker restart.

Not used by `edged run`: the daemon talks to whatever broker its config names.

`netns=NAME` runs it inside a network namespace of the caller's (the fleet tests' separate hosts),
listening on `host` there; `in_netns()` runs a function on a thread that joined such a namespace.

    with Broker(tmp, persistence=True) as b:   # started; stopped and its store removed on exit
        ... connect to b.host:b.port ...
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from edged.errors import UnavailableError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Mosquitto drops messages to a slow client past max_queued_messages (1000 by default), and tests
# and the bench push thousands of frames; paho never sets TCP_NODELAY, so the broker must (FIELD-NOTES)
BASE_LINES = ("allow_anonymous true", "max_queued_messages 100000", "set_tcp_nodelay true")


def mosquitto_path() -> str:
    """The mosquitto executable, or UnavailableError saying how to install it."""
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(path, os.X_OK):
        raise UnavailableError("mosquitto is not installed (`make test` or tools/ensure_mosquitto.sh installs it)")
    return path


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening(host: str, port: int, timeout: float = 0.3) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


CLONE_NEWNET = 0x40000000


def in_netns(name: str, fn: Callable[[], Any]) -> Any:
    """fn() on a short-lived thread inside the network namespace /run/netns/<name> (a namespace is
    per thread: the caller's stays as it was); its exception is raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {name}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    t = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _writable_by_broker(path: Path) -> None:
    """Started as root, Mosquitto drops to the user `mosquitto` (or `nobody` where that is missing):
    its persistence store must be that user's."""
    if os.geteuid() != 0:
        return
    for name in ("mosquitto", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            os.chown(path, pw.pw_uid, pw.pw_gid)
            return


class Broker:
    """Mosquitto on HOST:<free port>, its config and log in `workdir`.

    extra: config lines appended after ours (a later line overrides an earlier one, e.g.
    `allow_anonymous false`). persistence: keep sessions and queued messages across a stop/start,
    in a store of the broker's own under the system temp dir (pytest's 0700 folders are closed to
    the user Mosquitto drops to); `store` names it, close() removes it. name: the stem of the
    .conf and .log files (default mosquitto-<port>). preexec_fn: run in the child before exec
    (the soak's parent-death signal).
    """

    def __init__(self, workdir: Path, extra: Sequence[str] = (), *, port: int | None = None,
                 persistence: bool = False, autosave_s: int = 60, name: str | None = None,
                 preexec_fn: Callable[[], None] | None = None, netns: str | None = None,
                 host: str = HOST) -> None:
        self.exe = mosquitto_path()
        self.host = host
        self.netns = netns
        self.port = port or (1883 if netns else free_port(self.host))
        self.dir = Path(workdir)
        stem = name or f"mosquitto-{self.port}"
        self.conf = self.dir / f"{stem}.conf"
        self.log = self.dir / f"{stem}.log"
        self.store: Path | None = None
        lines = [f"listener {self.port} {self.host}", *BASE_LINES]
        if persistence:
            self.store = Path(tempfile.mkdtemp(prefix="edged-mqdb-"))
            _writable_by_broker(self.store)
            lines += ["persistence true", f"persistence_location {self.store}/", f"autosave_interval {autosave_s}"]
        self.conf.write_text("\n".join([*lines, *extra]) + "\n")
        self._preexec = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The broker's process id; UnavailableError when it is not started."""
        if self.proc is None:
            raise UnavailableError(f"mosquitto on {self.host}:{self.port} is not started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> Broker:
        """Start it and return once it accepts connections; UnavailableError (naming the log) if it
        exits or does not listen within `timeout` seconds."""
        if self.running():
            return self
        with open(self.log, "ab") as log:
            # a session of its own: a Ctrl-C meant for us does not reach it; stop() ends it in order
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen([*prefix, self.exe, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                                         preexec_fn=self._preexec)
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise UnavailableError(f"mosquitto exited {rc} on start; see {self.log}: {self._last_log_line()}")
            if self._listening():
                logger.debug("mosquitto %d listening on %s:%d", self.proc.pid, self.host, self.port)
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise UnavailableError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout:g} s; "
                                       f"see {self.log}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        if self.netns is None:
            return listening(self.host, self.port, timeout=0.2)
        return bool(in_netns(self.netns, lambda: listening(self.host, self.port, timeout=0.2)))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Mosquitto writes its persistence store on the way out), SIGKILL past `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def close(self) -> None:
        """Stop it and remove its persistence store; safe twice."""
        self.stop()
        if self.store is not None:
            shutil.rmtree(self.store, ignore_errors=True)
            self.store = None

    def _last_log_line(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
