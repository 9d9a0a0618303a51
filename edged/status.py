"""The local status socket: the daemon answers each connection with its status JSON.

Server: a Unix stream socket (mode 0660) in the runtime directory; each client
gets one JSON document and the connection is closed. Only a socket is ever
replaced at that path: a stale one nobody answers on is removed, anything
else there (a regular file, a folder) is refused and left alone.
Client: `edged status`, with one deadline for the whole exchange and a cap
on the answer, so a server that trickles bytes cannot hold it.
A client may instead send one command line at once after connecting (e.g.
`model-rollback`); it gets that command's JSON answer. A client that sends
nothing within COMMAND_WAIT_S gets the status, as before.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from typing import Any
from collections.abc import Callable

from edged.errors import ConfigError, UnavailableError

logger = logging.getLogger(__name__)

MAX_STATUS_BYTES = 16 << 20  # a status with 64 workers is ~40 KiB
COMMAND_WAIT_S = 0.2  # how long the server waits for a command line before it sends the status


class StatusServer:
    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]],
                 commands: dict[str, Callable[[], dict[str, Any]]] | None = None) -> None:
        self.path = path
        self.snapshot = snapshot
        self.commands = commands or {}
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            mode: int | None = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise ConfigError(f"{self.path} exists and is not a socket (edged replaces only a stale socket)")
            if _alive(self.path):
                raise UnavailableError(f"status.socket {self.path}: another edged already answers there")
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        sock.listen(8)
        self.sock = sock
        self._thread = threading.Thread(target=self._serve, name="status-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self.sock
        while sock is not None:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                cmd = _command(conn) if self.commands else None
            except Exception:  # a broken client must not stop the server
                cmd = None
            if cmd is not None:  # a command may take a while (a rollback swaps workers): not on this thread
                threading.Thread(target=self._answer, args=(conn, cmd), name="status-command", daemon=True).start()
                continue
            with conn:
                try:
                    conn.settimeout(2.0)
                    conn.sendall(json.dumps(self.snapshot()).encode() + b"\n")
                except Exception:  # a broken client must not stop the server
                    logger.debug("status client failed", exc_info=True)

    def _answer(self, conn: socket.socket, cmd: str) -> None:
        with conn:
            try:
                fn = self.commands.get(cmd)
                answer = fn() if fn else {"ok": False, "error": f"unknown command {cmd[:40]!r}"}
                conn.settimeout(2.0)
                conn.sendall(json.dumps({"command": cmd[:40], **answer}).encode() + b"\n")
            except Exception:
                logger.debug("status command %r failed", cmd, exc_info=True)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _command(conn: socket.socket) -> str | None:
    """A command line the client sent at once (at most 64 bytes), or None."""
    import select

    r, _, _ = select.select([conn], [], [], COMMAND_WAIT_S)
    if not r:
        return None
    conn.settimeout(1.0)
    data = b""
    while b"\n" not in data and len(data) < 64:
        chunk = conn.recv(64 - len(data))
        if not chunk:
            break
        data += chunk
    text = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    return text or None


def command(path: str, cmd: str, timeout: float = 180.0) -> dict[str, Any]:
    """Send one command to a running daemon and return its answer; UnavailableError when nothing answers."""
    for _ in range(3):  # a client stalled past COMMAND_WAIT_S before it wrote gets the status: ask again
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
                s.sendall(cmd.encode() + b"\n")
                chunks: list[bytes] = []
                while sum(map(len, chunks)) <= MAX_STATUS_BYTES:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
        except OSError as exc:
            raise UnavailableError(f"no edged answers on {path}: {exc.strerror or exc}") from None
        try:
            answer = dict(json.loads(b"".join(chunks)))
        except ValueError:
            raise UnavailableError(f"edged on {path} sent no answer") from None
        if answer.get("command") == cmd:
            return answer
    raise UnavailableError(f"edged on {path} did not take the command {cmd!r}")


def _alive(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(path)
            return True
    except OSError:
        return False


def query(path: str, timeout: float = 5.0, limit: int = MAX_STATUS_BYTES) -> dict[str, Any]:
    """Ask a running daemon for its status; UnavailableError when nothing answers in `timeout` seconds.

    `timeout` bounds the whole exchange (connect and every read), not each read.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    got = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(f"edged on {path} sent no complete status within {timeout:g} s "
                                           f"({got} bytes)")
                s.settimeout(left)
                data = s.recv(65536)
                if not data:
                    break
                got += len(data)
                if got > limit:
                    raise UnavailableError(f"edged on {path} sent more than {limit} bytes of status")
                chunks.append(data)
    except TimeoutError:
        raise UnavailableError(f"edged on {path} sent no complete status within {timeout:g} s ({got} bytes)") \
            from None
    except OSError as exc:
        raise UnavailableError(f"no edged answers on {path}: {exc.strerror or exc}") from None
    try:
        return dict(json.loads(b"".join(chunks)))
    except ValueError:
        raise UnavailableError(f"edged on {path} sent no status") from None


def render(st: dict[str, Any]) -> str:
    """A readable table of the status."""
    m = st.get("model", {})
    inp = m.get("input", {})
    fr = st.get("frames", {})
    lat = st.get("latency_ms", {})
    pool = st.get("pool", {})
    acc = st.get("accelerator", {})
    rows = [
        ("state", f"{st.get('state')}" + (f" ({st['state_reason']})" if st.get("state_reason") else "")),
        ("version", st.get("version")),
        ("uptime", f"{st.get('uptime_s', 0):.0f} s"),
        ("model", f"{m.get('name', '')} ({m.get('task')}) {m.get('path', '')}"),
        ("input", f"{inp.get('shape')} {inp.get('dtype')}"),
        ("accelerator", f"{acc.get('chosen')}" + "".join(f"; {s['kind']} skipped: {s['reason']}"
                                                          for s in acc.get("skipped", []))),
        *[("set aside", f"{a.get('kind')} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a.get('since', 0)))}"
                         f", next probe in {a.get('next_probe_s')} s: {a.get('reason')}")
          for a in acc.get("set_aside") or []],
        *([("temperature", f"{acc['temperature_c']} °C")] if acc.get("temperature_c") is not None else []),
        ("frames", f"received {fr.get('received', 0)}  completed {fr.get('completed', 0)}  "
                   f"errors {fr.get('errors', 0)}  dropped {fr.get('dropped', 0)}"),
        ("latency", f"p50 {lat.get('p50', 0)} ms  p95 {lat.get('p95', 0)} ms  p99 {lat.get('p99', 0)} ms"),
        ("queue", st.get("queue_depth")),
        ("pool", f"{pool.get('used_bytes', 0) >> 10}/{pool.get('capacity_bytes', 0) >> 10} KiB  high-water "
                 f"{pool.get('high_water_bytes', 0) >> 10} KiB  fragmentation {pool.get('fragmentation', 0)}  "
                 f"grows {pool.get('grows', 0)}  shrinks {pool.get('shrinks', 0)}"),
        ("mqtt", f"connected {st.get('mqtt', {}).get('connected')}  reconnects {st.get('mqtt', {}).get('reconnects')}"),
        ("memory", f"daemon RSS {st.get('memory', {}).get('rss_bytes', 0) >> 20} MiB"),
    ]
    for w in st.get("workers", []):
        rows.append(
            (
                f"worker {w.get('index')}",
                f"pid {w.get('pid')}  {w.get('state')}  restarts {w.get('restarts')}  "
                f"sandboxed {'yes' if w.get('sandboxed') else 'no'}"
                + (f" ({w['sandbox_profile']})" if w.get("sandbox_profile") not in (None, "default", "off") else "")
                + f"  RSS {(w.get('rss_bytes') or 0) >> 20} MiB"
                + (f"  batch {w['batch_max']} ({w.get('batched', 0)} batched)" if w.get("batch_max", 1) > 1 else "")
                + (f"  on {w['accelerator']}" if w.get("accelerator") else "")
                + (
                    f"  self-test {w['selftest'].get('result')} (max diff {w['selftest'].get('max_diff')})"
                    if isinstance(w.get("selftest"), dict)
                    else ""
                ),
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
