"""The control channel between supervisor and worker: its framing and its typed messages.

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

import array
import dataclasses
import json
import math
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from edged.errors import ProtocolError

MAX_MESSAGE = 64 << 20  # the framing's own ceiling; each Reader may set a lower one
_HDR = struct.Struct(">I")
_MAX_FDS = 16

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
    """The model is loaded on `accelerator`; warm-up and the self-test follow (each invoke within the frame deadline)."""

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


# ---- framing --------------------------------------------------------------------------------------------------------
def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def encode(obj: dict[str, Any] | Message) -> bytes:
    if isinstance(obj, Message):
        obj = as_dict(obj)
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return _HDR.pack(len(body)) + body


def send(sock: socket.socket, obj: dict[str, Any] | Message, fds: tuple[int, ...] = ()) -> None:
    data = encode(obj)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)



class Reader:
    """Reassembles messages (and the fds sent with them) from a stream socket.

    `max_message` caps what one message may make us buffer; with `accept_fds`
    off (the supervisor reading a worker) any descriptor that arrives is
    closed at once and the channel is broken.
    """

    def __init__(self, sock: socket.socket, chunk: int = 1 << 16, *, max_message: int = MAX_MESSAGE,
                 accept_fds: bool = True) -> None:
        self.sock = sock
        self.chunk = chunk
        self.max_message = max_message
        self.accept_fds = accept_fds
        self.buf = bytearray()
        self.fds: list[int] = []
        self._error: ProtocolError | None = None

    def _fill(self) -> None:
        room = socket.CMSG_SPACE(_MAX_FDS * 4) if self.accept_fds else socket.CMSG_SPACE(4)
        data, anc, flags, _addr = self.sock.recvmsg(self.chunk, room)
        got: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                got.extend(fds)
        if got and not self.accept_fds:
            for fd in got:
                os.close(fd)
            raise ProtocolError(f"peer sent {len(got)} file descriptor(s), which this channel refuses")
        self.fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were dropped in transit (fd limit reached)")
        if not data:
            raise ProtocolError("channel closed")
        self.buf += data

    def read(self) -> dict[str, Any]:
        """Block until one whole message is in; return it."""
        while len(self.buf) < 4:
            self._fill()
        size = self._size()
        while len(self.buf) < 4 + size:
            self._fill()
        return self._take(size)

    def read_available(self) -> list[dict[str, Any]]:
        """One receive (the socket is readable: it does not block), then every whole message buffered."""
        if self._error is not None:
            raise self._error
        self._fill()
        out: list[dict[str, Any]] = []
        try:
            while len(self.buf) >= 4:
                size = self._size()
                if len(self.buf) < 4 + size:
                    break
                out.append(self._take(size))
        except ProtocolError as exc:
            if not out:
                raise
            self._error = exc  # the good messages before it first; the next call raises
        return out

    def _size(self) -> int:
        """The body length in the buffered header, within the limit."""
        (size,) = _HDR.unpack_from(self.buf)
        if size > self.max_message:
            raise ProtocolError(f"message of {size} bytes exceeds the limit of {self.max_message}")
        return size

    def _take(self, size: int) -> dict[str, Any]:
        body = bytes(self.buf[4 : 4 + size])
        del self.buf[: 4 + size]
        try:
            msg = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"malformed message: {str(exc)[:200]}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            raise ProtocolError("message without a type")
        return msg

    def read_within(self, timeout: float) -> dict[str, Any] | None:
        """The next message if one starts arriving within `timeout` seconds, else None."""
        if not self.buf:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                return None
        return self.read()

    @property
    def failed(self) -> ProtocolError | None:
        """What ended read_available() after the messages it returned, if anything did."""
        return self._error

    def take_fd(self) -> int:
        if not self.fds:
            raise ProtocolError("expected a file descriptor with the message")
        return self.fds.pop(0)
