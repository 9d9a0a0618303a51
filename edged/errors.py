"""edged's exception tree: every error the package raises on purpose is an EdgedError.

    EdgedError
     +-- ConfigError       invalid config file (exit 78)
     +-- ModelError        model cannot load or does not fit the task (exit 78)
     +-- FrameError        a frame that cannot be served (carries the result's error code)
     +-- WorkerError       a worker died, hung or broke protocol
     |    +-- ProtocolError   the control channel closed or carried a malformed message
     +-- SandboxError      the sandbox cannot be set up (rlimits, fds, seccomp)
     +-- PoolError         misuse of the frame pool: double or foreign free, use after close
     +-- MqttError         the MQTT client library refused an operation (translated where paho is used)
     +-- UnavailableError  daemon or broker not reachable (exit 69)

Third-party libraries are imported in one module each, and that module turns
their errors into these (`raise MqttError(...) from exc`); tests/test_errors.py
fails when a public function lets another exception out for a user mistake.
"""
from __future__ import annotations


class EdgedError(Exception):
    """Root of every error edged raises on purpose."""


class ConfigError(EdgedError):
    """The config file is invalid; the message names file, line and key."""


class ModelError(EdgedError):
    """The model cannot be loaded or used; the message names the model and cause."""


class FrameError(EdgedError):
    """A frame cannot be served. `code` is the error code of the result JSON."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerError(EdgedError):
    """A worker process died, hung or sent something it should not."""


class ProtocolError(WorkerError):
    """The peer closed the channel or sent a malformed message."""


class SandboxError(EdgedError):
    """The sandbox could not be set up as asked."""


class PoolError(EdgedError):
    """Misuse of the frame pool: double or foreign free, use after close, bad size."""


class MqttError(EdgedError):
    """The MQTT client library refused an operation, or the broker refused us."""


class UnavailableError(EdgedError):
    """The daemon or broker is not reachable (EX_UNAVAILABLE)."""
