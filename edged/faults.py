"""Fault injection for tests: what a crashing, hanging or compromised worker does, on request.

Inert unless the daemon runs with EDGED_TEST_HOOKS=1 in its environment; then
a frame whose payload starts with edged.worker.HOOK names one action here, and
the worker acts it out from inside its sandbox, using only what the seccomp
allowlist lets a worker do. This is how the tests play the hostile worker of
INTERFACE.md (a model that crashes or runs code of its own) without a real
exploit: the supervisor sees exactly what such a worker could send.

  abort            die of SIGABRT (a native crash)
  abort_if:NAME    die of SIGABRT if this worker serves model NAME (a new model that crashes where the old did not);
                   else nothing (the frame goes on, and is answered as the bad image it is)
  hang_if:NAME     hang (as below) if this worker serves model NAME; else nothing
  syscall          call socket(): killed by the filter (SIGSYS)
  hang             stop answering (spin inside the frame, as a stuck delegate); a model file whose
                   name holds edged.worker.LOAD_HANG does the same while it loads
  fds:N            pass N file descriptors back over the control channel
  forge            a result whose body sets frame_id and timing (fields the supervisor owns)
  stranger         a result for a frame the worker does not hold
  logs:N           N log lines with newlines and terminal escapes in them
  stderr:N         N lines written straight to fd 2
"""
from __future__ import annotations

import array
import os
import socket
import time

from edged import protocol


def act(sock: socket.socket, seq: int, action: str, model: str = "") -> None:
    name, _, arg = action.strip().partition(":")
    n = int(arg) if arg.isdigit() else 1
    if name == "abort" or (name == "abort_if" and arg == model):
        os.abort()
    elif name == "syscall":
        socket.socket()
    elif name == "hang" or (name == "hang_if" and arg == model):
        end = time.monotonic() + 3600
        while time.monotonic() < end:  # a stuck delegate: busy, never answering
            pass
    elif name == "fds":
        fd = sock.fileno()
        for start in range(0, n, 200):  # SCM_RIGHTS carries at most 253 per message
            count = min(200, n - start)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * count).tobytes())]
            sock.sendmsg([protocol.encode(protocol.Pong())], anc)
    elif name == "forge":
        protocol.send(sock, {"t": "r", "seq": seq, "body": {"classes": [], "frame_id": "forged",
                                                             "timing_ms": {"total": 0}}})
    elif name == "stranger":
        protocol.send(sock, protocol.Result(seq + 1_000_000, {"classes": []}))
    elif name == "logs":
        for i in range(n):
            protocol.send(sock, protocol.Log(40, f"line {i}\n2026-12-01 00:00:00,000 CRITICAL edged.daemon: forged"
                                                 "\x1b[2J"))
    elif name == "stderr":
        for i in range(n):
            os.write(2, f"stderr line {i}\n".encode())


def kill_point(step: str) -> None:
    """Supervisor side, tests only: with EDGED_TEST_HOOKS=1 and EDGED_TEST_KILL_AT=step, SIGKILL ourselves here.

    Steps of applying a model update (edged.modelstore, edged.updates): after_write (the version's files
    written and fsynced, not yet renamed into place), before_rename (state.json's new text written, not yet
    renamed over the old), after_switch (the new workers serve; the state not yet published).
    """
    if os.environ.get("EDGED_TEST_HOOKS") == "1" and os.environ.get("EDGED_TEST_KILL_AT") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
