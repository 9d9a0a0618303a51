"""edged's exception tree. EdgedError is the root.

    EdgedError
     +-- ConfigError    invalid config file (exit 78)
     +-- ModelError     model cannot load or does not fit the task (exit 78)
     +-- FrameError     a frame that cannot be served (carries an error code)
     +-- WorkerError    a worker died, hung or broke protocol
     +-- MqttError      the broker refused us or cannot be reached
     +-- UnavailableError  daemon or broker not reachable (exit 69)
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


class MqttError(EdgedError):
    """The MQTT broker refused us or cannot be reached."""


class UnavailableError(EdgedError):
    """The daemon or broker is not reachable (EX_UNAVAILABLE)."""
