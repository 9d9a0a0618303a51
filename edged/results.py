"""Results: the JSON answer of each frame, handed to the broker link, and the frame acknowledged.

One frame, one answer: `answer()` for what a worker sent back, `fail()` for
every error result. Either releases the frame's pool block first (its Lease,
exactly once), builds the JSON, and publishes it; the frame is acknowledged
to the broker only once the link took its answer. Answers always go out on
the daemon's own link (its persistent session holds them across a reconnect);
a fleet frame is acknowledged on the connection it came in on (Frame.ack).

When the link is busy (mqtt.result_buffer results already wait for the
broker's PUBACK) an answer waits here, its frame unacknowledged, and goes out
as PUBACKs free room (`flush()`, on the I/O thread). While the broker is away
and that buffer is full, a QoS 1 frame is left unacknowledged so that the
broker delivers it again; a QoS 0 frame's answer is lost, and counted
(`results_lost`). If publishing one answer fails, the frame is answered
`internal_error` on its default topic, and the failure logged once with the
frame's id.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edged.errors import MqttError
from edged.metrics import Metrics

if TYPE_CHECKING:
    from edged.admission import Frame
    from edged.mqtt import MqttLink
    from edged.protocol import Result
    from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)


class Results:
    def __init__(self, link: MqttLink, metrics: Metrics, result_buffer: int,
                 model_name: Callable[[], str | None],
                 on_result: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.link = link
        self.on_result = on_result  # sees each served result once it is out (Home Assistant's labels)
        self.metrics = metrics
        self.model_name = model_name
        self.waiting: collections.deque[_Item] = collections.deque()
        self.max_waiting = result_buffer
        self.waiting_qos0 = 0
        self._said: dict[str, float] = {}  # when each kind of loss was last logged
        self._quiet: dict[str, int] = {}  # and how many since

    def answer(self, frame: Frame, h: WorkerHandle, reply: Result) -> None:
        """The worker's reply for this frame, as the result JSON."""
        if frame.lease is not None:
            frame.lease.release()
        if reply.error_code is not None:
            self.fail(frame, reply.error_code, reply.error_message or "", h.model_name)
            return
        now = time.monotonic()
        timing = {"queue": round((frame.t_dispatch - frame.t_in) * 1e3, 3), "preprocess": reply.preprocess_ms,
                  "inference": reply.inference_ms, "total": round((now - frame.t_in) * 1e3, 3)}
        result: dict[str, Any] = {"frame_id": frame.frame_id, "stream": frame.stream, "model": h.model_name,
                                  "accelerator": h.accelerator, "task": h.info.get("task")}
        if reply.body:
            result.update(reply.body)  # its keys are checked by the protocol: none of the ones above
        result["timing_ms"] = timing
        result["ts"] = round(time.time(), 3)
        if self._publish(frame, result):
            timing["publish"] = round((time.monotonic() - now) * 1e3, 3)
            self.metrics.observe(timing)
            if self.on_result is not None:
                self.on_result(result)

    def fail(self, frame: Frame, code: str, message: str, model: str | None = None) -> None:
        if frame.lease is not None:
            frame.lease.release()
        self.metrics.error(code)
        result: dict[str, Any] = {"frame_id": frame.frame_id, "stream": frame.stream}
        name = model or self.model_name()
        if name:
            result["model"] = name
        result["error"] = {"code": code, "message": message}
        result["ts"] = round(time.time(), 3)
        self._publish(frame, result)

    def _publish(self, frame: Frame, result: dict[str, Any]) -> bool:
        """Hand the answer to the link and acknowledge its frame; False when it was not sent now."""
        item = (frame, _JSON.encode(result).encode(), "error" in result)
        if self.waiting:  # answers keep their order: behind those already waiting
            return self._wait(item)
        return self._send(item)

    def _send(self, item: _Item) -> bool:
        frame, payload, is_error = item
        try:
            outcome = self.link.publish(frame.out_topic, payload, correlation=frame.correlation)
        except MqttError as exc:
            self._refused(frame, is_error, exc)
            return False
        if outcome == "sent":
            self._ack(frame)
            return True
        if outcome == "busy" or frame.ack is not None:
            # a fleet frame is never delivered again (its session ends with its connection): it waits
            # here, at most the group's Receive Maximum of them
            return self._wait(item)
        self._not_held(frame)
        return False

    def _wait(self, item: _Item) -> bool:
        # QoS 1 frames wait without a cap of ours: the broker's Receive Maximum (queue.max_per_stream) bounds
        # how many unacknowledged frames we hold. QoS 0 frames have no such bound: mqtt.result_buffer of them.
        if item[0].qos or self.waiting_qos0 < self.max_waiting:
            self.waiting.append(item)
            self.waiting_qos0 += not item[0].qos
            self.metrics.count("results_waited")
        else:
            self._not_held(item[0])
        return False

    def _not_held(self, frame: Frame) -> None:
        if frame.qos and frame.ack is None:
            self.link.release(frame.mid)  # the broker delivers it again, and that delivery is run
        key = "not_held" if frame.qos else "results_lost"
        self.metrics.count(key)
        now = time.monotonic()
        self._quiet[key] = self._quiet.get(key, 0) + 1
        if now - self._said.get(key, -1e9) < 1.0:
            return  # one line a second at most: a flood must not become a log flood
        n, self._quiet[key], self._said[key] = self._quiet[key], 0, now
        if frame.qos:
            logger.warning("%d results already held (mqtt.result_buffer): frame %s (and %d more since the last "
                           "line) stays unacknowledged, the broker delivers it again", self.max_waiting,
                           frame.frame_id, n - 1)
        else:
            logger.warning("%d results already held (mqtt.result_buffer): the result of QoS 0 frame %s (and %d "
                           "more since the last line) is lost, counted in frames.results_lost", self.max_waiting,
                           frame.frame_id, n - 1)

    def _refused(self, frame: Frame, is_error: bool, exc: MqttError) -> None:
        """The client library refused this answer (its topic, its size): answer internal_error where we may."""
        logger.error("publishing the result of frame %s to %r failed: %s", frame.frame_id, frame.out_topic[:200], exc)
        if is_error and frame.out_topic == frame.default_topic:
            self.metrics.count("results_lost")
            self._ack(frame)  # answering again would fail again: counted, not retried
            return
        frame.out_topic, frame.correlation = frame.default_topic, None
        self.fail(frame, "internal_error", f"edged could not publish the result of frame {frame.frame_id}: {exc}")

    def _ack(self, frame: Frame) -> None:
        (frame.ack or self.link.ack)(frame.mid, frame.qos)

    def flush(self) -> None:
        """On the I/O thread, as the broker acknowledges: answers that waited go out, in order."""
        while self.waiting and self.link.has_room():
            item = self.waiting.popleft()
            self.waiting_qos0 -= not item[0].qos
            self._send(item)

    def connection_lost(self) -> None:
        """The broker delivers unacknowledged QoS 1 frames again: their waiting answers would be duplicates.
        A fleet frame's answer stays: nobody delivers that frame to us again."""
        for frame, _payload, _error in self.waiting:
            if frame.qos and frame.ack is None:
                self.link.release(frame.mid)
        self.waiting = collections.deque(item for item in self.waiting if not item[0].qos or item[0].ack)
        self.waiting_qos0 = sum(not item[0].qos for item in self.waiting)


_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder, not one per result (json.dumps with options)

_Item = tuple["Frame", bytes, bool]
