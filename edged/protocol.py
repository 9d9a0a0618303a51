"""The control channel between supervisor and worker: its typed messages (the framing is edged.channel).

Framing: an AF_UNIX SOCK_STREAM socketpair carries length-prefixed JSON
messages (4-byte big-endian length, then UTF-8 JSON); file descriptors (new
pool segments) ride along as SCM_RIGHTS ancillary data, from the supervisor to
the worker only. JSON, never pickle: the worker runs untrusted model code.

Messages are the frozen dataclasses below, with named fields; `encode()` is
the one encoder and `decode()` the one validating decoder, used by the
supervisor, the worker and the bench alike. The decoder is where a hostile
worker's reply is refused: an unknown type, a missing or extra field, a field
of the wrong type or out of bounds, a result body with a field the supervisor
owns (frame id, topic, timing...) is a ProtocolError, and the supervisor ends
a worker that sends one (INTERFACE.md: "whatever it sends back that is not a
well-formed reply for a frame it holds ends that worker").

  supervisor -> worker: Init, SegmentAdd (+fd), SegmentDrop, FrameJob, Ping, SelfTest, Stop
  worker -> supervisor: Loaded, Ready, Fatal, Result, Pong, SelfTestReport, Log
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from edged import channel
from edged.channel import MAX_MESSAGE, Reader
from edged.errors import ProtocolError


__all__ = ["MAX_MESSAGE", "ProtocolError", "Reader", "decode", "encode", "send"]


# ---- messages -------------------------------------------------------------------------------------------------------
class Message:
    """Base of the typed messages; TAG is the wire type, FIELDS the checks of each field."""

    TAG: ClassVar[str] = ""
    # field -> (accepted types, optional bound check); filled in by each class
    FIELDS: ClassVar[dict[str, tuple[tuple[type, ...], Any]]] = {}


def _short(limit: int) -> Any:
    return lambda v: len(v) <= limit


def _nonneg(v: Any) -> bool:
    return v >= 0


def _kinds(v: list[Any]) -> bool:
    return len(v) <= 16 and all(isinstance(k, str) and 0 < len(k) <= 32 for k in v)


@dataclass(frozen=True, slots=True)
class Init(Message):
    """The worker's whole brief: the config as text (the worker parses it, the supervisor never re-reads it)."""

    TAG = "init"
    config_text: str
    config_name: str
    config_base: str
    sandbox: bool
    sandbox_mode: str
    memory_limit: int
    batch_max: int
    batch_wait_ms: float
    max_fds: int
    log_level: int
    coral_device: str | None = None
    model_path: str | None = None
    model_task: str | None = None  # set by a model update: then model_labels replaces model.labels (None: no labels)
    model_labels: str | None = None
    accelerators: list[str] | None = None  # the kinds to try, in order (None: accelerator.prefer)
    FIELDS = {"config_text": ((str,), None), "config_name": ((str,), None), "config_base": ((str,), None),
              "sandbox": ((bool,), None), "sandbox_mode": ((str,), None), "memory_limit": ((int,), _nonneg),
              "batch_max": ((int,), _nonneg), "batch_wait_ms": ((int, float), _nonneg), "max_fds": ((int,), _nonneg),
              "log_level": ((int,), None), "coral_device": ((str, type(None)), None),
              "model_path": ((str, type(None)), None),
              "model_task": ((str, type(None)), lambda v: v in (None, "classify", "detect", "raw")),
              "model_labels": ((str, type(None)), None), "accelerators": ((list, type(None)), _kinds)}


@dataclass(frozen=True, slots=True)
class SegmentAdd(Message):
    TAG = "seg"
    id: int
    size: int
    FIELDS = {"id": ((int,), _nonneg), "size": ((int,), _nonneg)}


@dataclass(frozen=True, slots=True)
class SegmentDrop(Message):
    TAG = "unseg"
    id: int
    FIELDS = {"id": ((int,), _nonneg)}


@dataclass(frozen=True, slots=True)
class FrameJob(Message):
    """A frame to serve: `length` bytes at `offset` of pool segment `segment`."""

    TAG = "f"
    seq: int
    segment: int
    offset: int
    length: int
    content_type: str | None = None
    FIELDS = {"seq": ((int,), None), "segment": ((int,), _nonneg), "offset": ((int,), _nonneg),
              "length": ((int,), _nonneg), "content_type": ((str, type(None)), _short(256))}


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TAG = "ping"
    n: int | None = None
    FIELDS = {"n": ((int, type(None)), None)}


@dataclass(frozen=True, slots=True)
class SelfTest(Message):
    """Run the self-test frames again now, between frames (the in-service check, model.selftest.interval_s)."""

    TAG = "selftest"
    FIELDS = {}


@dataclass(frozen=True, slots=True)
class Stop(Message):
    TAG = "stop"
    FIELDS = {}


def _info(v: dict[str, Any]) -> bool:
    return len(json.dumps(v)) <= 1 << 16


SELFTEST_MAX_VALUES = 1 << 14  # what one self-test report may carry, over all frames and outputs


def _selftest(v: dict[str, Any]) -> bool:
    """{"outputs": [[[number, ...] per output] per frame], "ms": number, "frames": digest}, bounded."""
    if v.keys() != {"outputs", "ms", "frames"} or not isinstance(v["ms"], (int, float)) or not _ms(v["ms"]):
        return False
    if not isinstance(v["frames"], str) or len(v["frames"]) > 128:
        return False
    frames = v["outputs"]
    if not isinstance(frames, list) or not 0 < len(frames) <= 16:
        return False
    total = 0
    for outs in frames:
        if not isinstance(outs, list) or not 0 < len(outs) <= 64:
            return False
        for data in outs:
            if not isinstance(data, list):
                return False
            total += len(data)
            if total > SELFTEST_MAX_VALUES or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in data):
                return False
    return True


@dataclass(frozen=True, slots=True)
class Ready(Message):
    """The model is loaded (and the filter in place when sandboxed); what the worker found."""

    TAG = "ready"
    model: dict[str, Any]
    accelerator: dict[str, Any]
    task: str
    batch: int
    sandboxed: bool
    sandbox_profile: str
    selftest: dict[str, Any] | None = None  # the self-test's outputs (edged.selftest.run), checked by the supervisor
    FIELDS = {"model": ((dict,), _info), "accelerator": ((dict,), _info), "task": ((str,), _short(16)),
              "batch": ((int,), lambda v: 1 <= v <= 4096), "sandboxed": ((bool,), None),
              "sandbox_profile": ((str,), _short(32)), "selftest": ((dict, type(None)), _selftest)}


@dataclass(frozen=True, slots=True)
class Loaded(Message):
    """The model is loaded on `accelerator`; warm-up and the self-test follow (each invoke within the deadline)."""

    TAG = "loaded"
    accelerator: str
    invokes: int
    FIELDS = {"accelerator": ((str,), _short(32)), "invokes": ((int,), lambda v: 0 <= v <= 64)}




@dataclass(frozen=True, slots=True)
class SelfTestReport(Message):
    """The answers to a SelfTest: the same report as Ready.selftest."""

    TAG = "selftested"
    report: dict[str, Any]
    FIELDS = {"report": ((dict,), _selftest)}


@dataclass(frozen=True, slots=True)
class Fatal(Message):
    TAG = "fatal"
    kind: str
    message: str
    FIELDS = {"kind": ((str,), _short(16)), "message": ((str,), _short(4096))}


# the result body may carry these fields only; everything else in the result JSON is the supervisor's
BODY_FIELDS = frozenset({"classes", "detections", "outputs"})
_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")


def _body(v: dict[str, Any] | None) -> bool:
    return v is None or (v.keys() <= BODY_FIELDS and all(isinstance(x, list) for x in v.values()))


def _code(v: str | None) -> bool:
    return v is None or (0 < len(v) <= 32 and set(v) <= _CODE_CHARS)


def _ms(v: float) -> bool:
    return math.isfinite(v) and 0 <= v < 1e9


@dataclass(frozen=True, slots=True)
class Result(Message):
    """The answer for one frame: a body, or an error code and message."""

    TAG = "r"
    seq: int
    body: dict[str, Any] | None = None
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    batch: int = 1
    error_code: str | None = None
    error_message: str | None = None
    FIELDS = {"seq": ((int,), None), "body": ((dict, type(None)), _body), "preprocess_ms": ((int, float), _ms),
              "inference_ms": ((int, float), _ms), "batch": ((int,), lambda v: 1 <= v <= 4096),
              "error_code": ((str, type(None)), _code), "error_message": ((str, type(None)), _short(1000))}


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TAG = "pong"
    n: int | None = None
    FIELDS = {"n": ((int, type(None)), None)}


@dataclass(frozen=True, slots=True)
class Log(Message):
    TAG = "log"
    level: int
    msg: str
    FIELDS = {"level": ((int,), lambda v: 0 <= v <= 50), "msg": ((str,), _short(4096))}


TO_WORKER: tuple[type[Message], ...] = (Init, SegmentAdd, SegmentDrop, FrameJob, Ping, SelfTest, Stop)
FROM_WORKER: tuple[type[Message], ...] = (Loaded, Ready, Fatal, Result, Pong, SelfTestReport, Log)
_BY_TAG: dict[str, type[Message]] = {c.TAG: c for c in (*TO_WORKER, *FROM_WORKER)}
_NAMES: dict[type[Message], tuple[str, ...]] = {c: tuple(f.name for f in dataclasses.fields(c))  # type: ignore[arg-type]
                                                for c in _BY_TAG.values()}
_REQUIRED: dict[type[Message], frozenset[str]] = {
    c: frozenset(f.name for f in dataclasses.fields(c)  # type: ignore[arg-type]
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    for c in _BY_TAG.values()}


def as_dict(msg: Message) -> dict[str, Any]:
    """The wire form of a message: its type tag and its named fields."""
    d: dict[str, Any] = {"t": msg.TAG}
    for name in _NAMES[type(msg)]:
        d[name] = getattr(msg, name)
    return d


def decode(raw: dict[str, Any], allowed: tuple[type[Message], ...]) -> Message:
    """Validate one received message against its schema; ProtocolError names what is wrong."""
    tag = raw.get("t")
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None or cls not in allowed:
        raise ProtocolError(f"unexpected message type {str(tag)[:32]!r}")
    fields = cls.FIELDS
    for key, value in raw.items():
        if key == "t":
            continue
        spec = fields.get(key)
        if spec is None:
            raise ProtocolError(f"{cls.TAG}: unknown field {key[:32]!r}")
        types, check = spec
        # bool is an int to Python, not to the schema (except where bool is what is asked)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{cls.TAG}.{key}: wrong type {type(value).__name__}")
        if check is not None and value is not None and not check(value):
            raise ProtocolError(f"{cls.TAG}.{key}: out of bounds")
    missing = _REQUIRED[cls] - raw.keys()
    if missing:
        raise ProtocolError(f"{cls.TAG}: missing {', '.join(sorted(missing))}")
    return cls(**{k: v for k, v in raw.items() if k != "t"})


# ---- framing (edged.channel), for messages too -----------------------------------------------------------------------
def encode(obj: dict[str, Any] | Message) -> bytes:
    return channel.encode(as_dict(obj) if isinstance(obj, Message) else obj)


def send(sock: socket.socket, obj: dict[str, Any] | Message, fds: tuple[int, ...] = ()) -> None:
    channel.send(sock, as_dict(obj) if isinstance(obj, Message) else obj, fds)
