"""The status socket (issue 17, point 8): only a socket is ever replaced, and `edged status` has a deadline.

Servers here are ours: real Unix sockets in tmp_path, one that trickles a byte at a time and one
that floods; the client is the real `edged status` as a subprocess.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BUNDLED, ROOT, edged_cmd
from test_config_bounds import limited

from edged.errors import ConfigError, UnavailableError
from edged.status import StatusServer, query


def _edged(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EDGED_CONFIG", None)
    # a client that keeps what a flooding server sends fails under its RLIMIT_DATA, not on the machine
    return subprocess.run(limited(edged_cmd(*args), 512 << 20), capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def _one_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- the server never deletes what is not a socket ---------------------------------------------------

def test_server_path_is_regular_file_refused_and_file_kept(tmp_path):
    path = tmp_path / "edged.sock"
    path.write_text("precious data\n")
    server = StatusServer(str(path), lambda: {"state": "online"})
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        server.start()
    assert path.read_text() == "precious data\n"
    server.close()
    assert path.read_text() == "precious data\n"  # close() of a server that never bound leaves it too


def test_server_path_is_directory_or_symlink_refused_and_kept(tmp_path):
    d = tmp_path / "edged.sock"
    d.mkdir()
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        StatusServer(str(d), dict).start()
    assert d.is_dir()
    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        StatusServer(str(link), dict).start()
    assert link.is_symlink() and target.read_text() == "x"


def test_server_stale_socket_replaced_and_answers(tmp_path):
    path = str(tmp_path / "edged.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a crashed daemon's socket: the node stays, nobody listens
    server = StatusServer(path, lambda: {"state": "online", "n": 1})
    server.start()
    try:
        assert query(path, timeout=5) == {"state": "online", "n": 1}
    finally:
        server.close()


def test_server_live_socket_of_another_daemon_refused(tmp_path):
    path = str(tmp_path / "edged.sock")
    first = StatusServer(path, lambda: {"state": "online"})
    first.start()
    try:
        with pytest.raises(UnavailableError, match="another edged already answers"):
            StatusServer(path, dict).start()
        assert query(path) == {"state": "online"}
    finally:
        first.close()


def test_run_status_socket_naming_regular_file_exits_78_file_kept(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("do not delete\n")
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(f"model:\n  path: {BUNDLED / 'digits.tflite'}\nmqtt:\n  port: 9\nstatus:\n  socket: notes.txt\n")
    line = _one_line(_edged("run", "-c", str(cfg)), 78)
    assert "edged.yaml:6 status.socket: " in line and "not a socket" in line, line
    assert keep.read_text() == "do not delete\n"


# -- the client: one deadline, a size cap ------------------------------------------------------------

@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket, threading.Event], None]], str]]:
    """A Unix socket server of ours; each connection is handed to `behave` in a thread."""
    stop = threading.Event()
    socks: list[socket.socket] = []

    def make(behave: Callable[[socket.socket, threading.Event], None]) -> str:
        path = str(tmp_path / f"fake{len(socks)}.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4)
        srv.settimeout(0.2)
        socks.append(srv)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=behave, args=(conn, stop), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield make
    stop.set()
    for s in socks:
        s.close()


def _trickle(conn: socket.socket, stop: threading.Event) -> None:
    """A valid status JSON, one byte every 50 ms: each read returns at once, the whole never comes."""
    body = json.dumps({"state": "online", "pad": "x" * 10000}).encode()
    with conn:
        for b in body:
            if stop.wait(0.05):
                return
            try:
                conn.sendall(bytes([b]))
            except OSError:
                return


def _flood(conn: socket.socket, stop: threading.Event) -> None:
    chunk = b" " * 65536  # JSON allows any amount of leading whitespace
    with conn:
        while not stop.is_set():
            try:
                conn.sendall(chunk)
            except OSError:
                return


def _silent(conn: socket.socket, stop: threading.Event) -> None:
    with conn:
        stop.wait(60)


@pytest.mark.parametrize("behave, words", [(_trickle, "no complete status within 1 s"),
                                           (_silent, "no complete status within 1 s"),
                                           (_flood, "more than 16777216 bytes")])
def test_status_client_slow_silent_or_flooding_server_exits_69_within_deadline(fake_server, behave, words):
    path = fake_server(behave)
    t0 = time.monotonic()
    r = _edged("status", "--socket", path, "--timeout", "1", timeout=30)
    took = time.monotonic() - t0
    line = _one_line(r, 69)
    assert line.startswith("edged status: ") and path in line and words in line, line
    assert took < 15, took  # the deadline is 1 s; the rest is interpreter start-up on a busy machine


def test_status_query_trickle_gives_up_at_total_deadline_not_per_read(fake_server):
    path = fake_server(_trickle)
    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match="within 0.5 s"):
        query(path, timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_status_client_timeout_must_be_positive():
    r = _edged("status", "--socket", "/nonexistent", "--timeout", "0")
    assert r.returncode == 2 and "must be a positive number" in r.stderr, r.stderr


def test_status_client_answers_from_a_real_server_within_deadline(tmp_path):
    path = str(tmp_path / "edged.sock")
    server = StatusServer(path, lambda: {"state": "online", "version": "x", "workers": []})
    server.start()
    try:
        r = _edged("status", "--json", "--socket", path, "--timeout", "5")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "online"
    finally:
        server.close()
    assert not os.path.exists(path)
