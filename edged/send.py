"""`edged send`: the command line's MQTT requester (frames out, their results back, re-sent when none comes).

It sets up TLS and authentication through the daemon's own helper
(edged.mqtt.new_client) and turns every failure, the broker's and the
client library's, into UnavailableError (exit 69) or ConfigError (exit 78).

Each frame carries a `frame_id`, a Response Topic private to this run and a
Message Expiry of `timeout` seconds. A frame with no answer within `timeout`
is published again under the same `frame_id`, up to `retries` times: the
end-to-end at-least-once pattern for a fleet, whose broker may lose the
frames that were in flight to a member that died (README "Scale-out").
Answers are keyed by `frame_id`; a second answer to a frame is counted, not
returned. An `expired` answer (the daemon saw the frame after its expiry) is
no answer: the frame is sent again while retries are left.
"""
from __future__ import annotations

import collections
import json
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edged import mqtt
from edged.config import Config
from edged.errors import UnavailableError


@dataclass
class Sent:
    """One frame of a run: when it was first sent, how often, and its answers (seconds since the run began)."""

    frame_id: str
    sent_at: float = 0.0
    attempts: int = 0
    answers: int = 0
    answered_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None  # the error code of its first answer, if that was an error result


@dataclass
class Report:
    frames: list[Sent] = field(default_factory=list)
    duration_s: float = 0.0
    t0: float = 0.0  # time.monotonic() when the first frame went out (one clock for every process here)

    def summary(self) -> dict[str, Any]:
        answered = [f for f in self.frames if f.answered_at is not None]
        last_sent = max((f.sent_at for f in self.frames), default=0.0)
        last = max((f.answered_at for f in answered if f.answered_at is not None), default=None)
        return {"sent": len(self.frames), "resent": sum(max(0, f.attempts - 1) for f in self.frames),
                "answered": len(answered), "answered_twice": sum(1 for f in self.frames if f.answers > 1),
                "unanswered": len(self.frames) - len(answered),
                "answered_after_resend": sum(1 for f in answered if f.attempts > 1),
                "error_answers": sum(1 for f in answered if f.error),
                "last_answer_s": None if last is None else round(last, 3),
                "last_answer_after_last_sent_s": None if last is None else round(last - last_sent, 3)}

    def as_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "duration_s": round(self.duration_s, 3), "t0_monotonic": self.t0,
                "frames": [{"frame_id": f.frame_id, "sent_at": round(f.sent_at, 4), "attempts": f.attempts,
                            "answers": f.answers, "error": f.error,
                            "answered_at": None if f.answered_at is None else round(f.answered_at, 4)}
                           for f in self.frames]}


def send_frames(cfg: Config, payload: bytes, stream: str = "cli", timeout: float = 10.0, *, count: int = 1,
                retries: int = 0, rate: float = 0.0, fleet: bool = False, linger: float = 0.0,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> Report:
    """Send `count` frames to P/in/<stream> (F/in/<stream> with fleet), `rate` per second (0: at once), each
    re-sent after `timeout` s without an answer, `retries` times at most; then listen `linger` s more for
    late second answers. on_result gets each frame's first answer."""
    if fleet and cfg.mqtt.share is None:
        raise UnavailableError(f"{cfg.source}: --fleet needs mqtt.share (the fleet's topic prefix)")
    prefix = cfg.mqtt.share.prefix.rstrip("/") if fleet and cfg.mqtt.share else cfg.prefix
    topic = f"{prefix}/in/{stream}"
    token = secrets.token_hex(6)
    reply = f"{cfg.prefix}/reply/{token}"
    ids = [f"send-{token}" if count == 1 else f"send-{token}-{i}" for i in range(count)]
    frames = {fid: Sent(fid) for fid in ids}
    cv = threading.Condition()
    subscribed = threading.Event()
    t0 = time.monotonic()
    c = mqtt.new_client(cfg, f"edged-send-{token}")
    c.on_subscribe = lambda *a: subscribed.set()
    c.max_inflight_messages_set(max(20, min(count, 1000)))

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            got = json.loads(msg.payload)
        except ValueError:
            got = {"_raw": msg.payload.decode("utf-8", "replace")}
        f = frames.get(str(got.get("frame_id"))) if isinstance(got, dict) else None
        if f is None:
            return
        with cv:
            if (got.get("error") or {}).get("code") == "expired" and f.attempts <= retries:
                return  # an old attempt, seen too late: the re-send answers
            f.answers += 1
            if f.answered_at is None:
                f.answered_at, f.result = time.monotonic() - t0, got
                code = (got.get("error") or {}).get("code")
                f.error = str(code) if code else None
                if on_result is not None:
                    on_result(got)
            cv.notify_all()

    c.on_message = on_message
    try:
        c.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=max(5, cfg.mqtt.keepalive))
    except (OSError, ValueError) as exc:
        raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} not reachable: {exc}") from None
    c.loop_start()
    try:
        c.subscribe(reply, qos=1)
        if not subscribed.wait(max(timeout, 5.0)):
            raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} did not confirm the subscription")
        expiry = max(1, math.ceil(timeout))

        def publish(f: Sent) -> None:
            props = mqtt.request_properties(reply, f.frame_id.encode(), f.frame_id)
            props.MessageExpiryInterval = expiry
            try:
                c.publish(topic, payload, qos=1, properties=props)
            except ValueError as exc:
                raise UnavailableError(f"cannot publish to {topic}: {exc}") from None

        due: collections.deque[tuple[float, Sent]] = collections.deque()  # (re-send deadline, frame), in order
        t0 = time.monotonic()
        nxt = 0
        while True:
            out: list[Sent] = []  # published outside the lock: paho's thread takes it for every answer
            with cv:
                now = time.monotonic()
                while nxt < count and (rate <= 0 or now >= t0 + nxt / rate):
                    f = frames[ids[nxt]]
                    f.sent_at, f.attempts = now - t0, 1
                    out.append(f)
                    due.append((now + timeout, f))
                    nxt += 1
                while due and (due[0][1].answered_at is not None or due[0][0] <= now):
                    _, f = due.popleft()
                    if f.answered_at is None and f.attempts <= retries:
                        f.attempts += 1
                        out.append(f)
                        due.append((now + timeout, f))
                if not out:
                    if nxt >= count and not due:
                        break
                    wake = due[0][0] if due else now + 1.0
                    if nxt < count and rate > 0:
                        wake = min(wake, t0 + nxt / rate)
                    cv.wait(max(0.0, wake - now))
            for f in out:
                publish(f)
        end = time.monotonic() + linger
        with cv:
            while time.monotonic() < end:  # a listening window for late answers, not a synchronisation
                cv.wait(end - time.monotonic())
        return Report(frames=[frames[i] for i in ids], duration_s=time.monotonic() - t0, t0=t0)
    finally:
        c.loop_stop()
        c.disconnect()


def send_frame(cfg: Config, payload: bytes, stream: str = "cli", timeout: float = 10.0,
               retries: int = 0, fleet: bool = False) -> dict[str, Any]:
    """Send one frame; return its result JSON, or UnavailableError when none came."""
    rep = send_frames(cfg, payload, stream, timeout, retries=retries, fleet=fleet)
    f = rep.frames[0]
    if f.result is None:
        where = f"{cfg.mqtt.share.prefix if fleet and cfg.mqtt.share else cfg.prefix}/in/{stream}"
        tries = f" ({f.attempts} attempts)" if f.attempts > 1 else ""
        raise UnavailableError(f"no result from edged on {where} within {timeout:g} s{tries}")
    return f.result
